#!/usr/bin/env node
'use strict';
// End-to-end smoke check of the mmserve gRPC contract from Node.js.
//
//   node clients/node/smoke.js --encoder HOST:PORT --decoder HOST:PORT
//
// 1. EncoderService.Encode: a PNG made here in memory and a float32 [T, C]
//    time series (MediaSource.array), both under fresh client uuids.
// 2. EncoderService.GetEmbedding for both: ids, modalities, token counts,
//    placement metadata.
// 3. DecoderService.Generate (streamed): text + the image by uuid (no source)
//    + the series by its id (source.embedding_id), greedy, 12 tokens at most;
//    checks the deltas, the single final message, usage and cached_media.
// 4. Generate with an unknown uuid: NOT_FOUND, with google.rpc.ErrorInfo and
//    BadRequest read from the grpc-status-details-bin trailer.
// 5. DeleteEmbedding for both (unless --keep).
//
// Prints one JSON line (the summary) on stdout. Exit 0 when every check held,
// 1 when one failed (the message says which, on stderr and in the JSON), 2 on
// bad usage. Every call has a deadline and an x-request-id.

const { MmserveClient, float32Tensor, grpc, newRequestId, richStatus, statusName, DEFAULT_MAX_MESSAGE_BYTES } = require('./mmserve');
const { testPattern } = require('./png');

const USAGE = `usage: node smoke.js --encoder HOST:PORT --decoder HOST:PORT
          [--timeout-ms 60000] [--request-id PREFIX] [--max-message-bytes ${DEFAULT_MAX_MESSAGE_BYTES}] [--keep]`;

class CheckFailed extends Error {}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

function parseArgs(argv) {
  const args = { timeoutMs: 60000, maxMessageBytes: DEFAULT_MAX_MESSAGE_BYTES, keep: false, requestId: null };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    switch (flag) {
      case '--encoder': args.encoder = value(); break;
      case '--decoder': args.decoder = value(); break;
      case '--timeout-ms': args.timeoutMs = Number(value()); break;
      case '--request-id': args.requestId = value(); break;
      case '--max-message-bytes': args.maxMessageBytes = Number(value()); break;
      case '--keep': args.keep = true; break;
      case '-h': case '--help': args.help = true; break;
      default: throw new Error(`unknown argument: ${flag}`);
    }
  }
  if (!args.help) {
    if (!args.encoder || !args.decoder) throw new Error('--encoder and --decoder are required');
    if (!(args.timeoutMs > 0)) throw new Error('--timeout-ms must be a positive number');
    if (!(args.maxMessageBytes > 0)) throw new Error('--max-message-bytes must be a positive number');
  }
  return args;
}

/** 400 samples x 2 channels at 100 Hz: two sines plus a little deterministic wobble. */
function timeSeries(samples = 400, channels = 2, rate = 100) {
  const rows = [];
  for (let t = 0; t < samples; t++) {
    const s = t / rate;
    const row = [];
    for (let c = 0; c < channels; c++) row.push(Math.sin(2 * Math.PI * (1 + 2 * c) * s) + 0.1 * Math.sin(12.9898 * t + 78.233 * c));
    rows.push(row);
  }
  return float32Tensor(rows);
}

function userMessage(...parts) {
  return { role: 'ROLE_USER', content: parts };
}

async function run(args, summary) {
  const base = args.requestId || newRequestId('node-smoke');
  const ids = {};
  const rid = (step) => (ids[step] = `${base}-${step}`);
  summary.request_ids = ids;
  const timings = {};
  summary.timings_ms = timings;
  const timed = async (step, fn) => {
    const start = process.hrtime.bigint();
    try {
      return await fn();
    } finally {
      timings[step] = Number((process.hrtime.bigint() - start) / 1000000n);
    }
  };
  const opts = (step) => ({ requestId: rid(step), timeoutMs: args.timeoutMs });

  const client = new MmserveClient({ encoder: args.encoder, decoder: args.decoder, maxMessageBytes: args.maxMessageBytes, timeoutMs: args.timeoutMs });
  try {
    summary.stage = 'connect';
    await timed('connect', () => client.waitForReady(args.timeoutMs));

    summary.stage = 'model-info';
    const info = await timed('model_info', () => client.getModelInfo(opts('model-info')));
    summary.model = info.model;
    summary.family = info.family;
    check(info.modalities.includes('MODALITY_IMAGE') && info.modalities.includes('MODALITY_TIME_SERIES'),
      `the encoder's model ${info.model} must take images and time series; it takes ${JSON.stringify(info.modalities)}`);

    // --- (a) Encode ---------------------------------------------------------------------
    summary.stage = 'encode';
    const suffix = base.replace(/[^A-Za-z0-9._:/-]/g, '-').slice(-60);
    const imageUuid = `node-img-${suffix}`;
    const seriesUuid = `node-ts-${suffix}`;
    const png = testPattern(96, 64);
    const series = timeSeries(400, 2, 100);
    const encoded = await timed('encode', () => client.encode([
      { modality: 'MODALITY_IMAGE', uuid: imageUuid, source: { data: png, mime_type: 'image/png' } },
      { modality: 'MODALITY_TIME_SERIES', uuid: seriesUuid, source: { array: series }, time_series: { sampling_rate: 100 } },
    ], opts('encode')));
    check(encoded.results.length === 2, `Encode returned ${encoded.results.length} results for 2 items`);
    const [imageResult, seriesResult] = encoded.results;
    for (const [result, uuid, modality] of [[imageResult, imageUuid, 'MODALITY_IMAGE'], [seriesResult, seriesUuid, 'MODALITY_TIME_SERIES']]) {
      const e = result.embedding;
      check(e && e.id === uuid, `Encode: expected id ${uuid}, got ${e && e.id}`);
      check(e.client_uuid === true, `Encode: ${uuid} should be marked client_uuid`);
      check(e.modality === modality, `Encode: ${uuid} has modality ${e.modality}, expected ${modality}`);
      check(e.token_count >= 1, `Encode: ${uuid} has token_count ${e.token_count}, expected >= 1`);
      check(e.model_fingerprint === info.model_fingerprint, `Encode: ${uuid} fingerprint ${e.model_fingerprint} != GetModelInfo's ${info.model_fingerprint}`);
    }
    summary.image = { id: imageUuid, png_bytes: png.length, token_count: imageResult.embedding.token_count, cached: imageResult.cached };
    summary.time_series = { id: seriesResult.embedding.id, shape: series.shape, token_count: seriesResult.embedding.token_count, cached: seriesResult.cached };

    // --- (b) GetEmbedding ---------------------------------------------------------------
    summary.stage = 'get-embedding';
    const image = (await timed('get_image', () => client.getEmbedding(imageUuid, opts('get-image')))).embedding;
    check(image.id === imageUuid && image.modality === 'MODALITY_IMAGE', `GetEmbedding(${imageUuid}): got id ${image.id}, modality ${image.modality}`);
    check(image.token_count === imageResult.embedding.token_count,
      `GetEmbedding(${imageUuid}): token_count ${image.token_count} != Encode's ${imageResult.embedding.token_count}`);
    check(image.placement === 'image' && image.image.grid_thw.length === 3, `GetEmbedding(${imageUuid}): no image placement (${image.placement})`);
    const [gt, gh, gw] = image.image.grid_thw;
    const merge = image.image.spatial_merge_size;
    check(merge > 0 && image.token_count === (gt * gh * gw) / (merge * merge),
      `GetEmbedding(${imageUuid}): token_count ${image.token_count} != grid ${gt}x${gh}x${gw} / ${merge}^2`);
    check(image.image.source_size.join('x') === '96x64', `GetEmbedding(${imageUuid}): source_size ${image.image.source_size.join('x')}, sent 96x64`);
    check(image.tensors.length >= 1 && image.tensors[0].name === 'embeddings' && image.tensors[0].shape[0] === image.token_count,
      `GetEmbedding(${imageUuid}): first tensor should be "embeddings" [${image.token_count}, hidden], got ${JSON.stringify(image.tensors[0])}`);

    const ts = (await timed('get_time_series', () => client.getEmbedding(seriesUuid, opts('get-time-series')))).embedding;
    check(ts.id === seriesUuid && ts.modality === 'MODALITY_TIME_SERIES', `GetEmbedding(${seriesUuid}): got id ${ts.id}, modality ${ts.modality}`);
    check(ts.token_count === seriesResult.embedding.token_count,
      `GetEmbedding(${seriesUuid}): token_count ${ts.token_count} != Encode's ${seriesResult.embedding.token_count}`);
    check(ts.placement === 'time_series', `GetEmbedding(${seriesUuid}): no time_series placement (${ts.placement})`);
    const p = ts.time_series;
    check(p.num_samples === 400 && p.num_channels === 2 && p.sampling_rate === 100,
      `GetEmbedding(${seriesUuid}): placement ${p.num_samples} samples x ${p.num_channels} channels at ${p.sampling_rate} Hz, sent 400 x 2 at 100 Hz`);
    summary.image.grid_thw = image.image.grid_thw;
    summary.image.spatial_merge_size = merge;
    summary.image.hidden = image.tensors[0].shape[1];
    summary.time_series.patch_length = p.patch_length;

    // --- (c) Generate ---------------------------------------------------------------------
    summary.stage = 'generate';
    const question = 'Describe the picture and the signal.';
    const sampling = { temperature: 0, max_tokens: 12 };
    // The same text with no media, to know what the text alone needs.
    const textOnly = await timed('generate_text_only', () => client.generate(
      { messages: [userMessage({ text: question })], sampling: { temperature: 0, max_tokens: 1 } }, opts('generate-text-only')));
    const textOnlyUsage = textOnly[textOnly.length - 1].usage;
    check(textOnlyUsage && textOnlyUsage.prompt_tokens > 0, 'Generate (text only): no usage on the last message');

    const request = {
      messages: [userMessage(
        { text: question },
        { media: { modality: 'MODALITY_IMAGE', uuid: imageUuid } },
        { media: { modality: 'MODALITY_TIME_SERIES', source: { embedding_id: seriesUuid } } },
      )],
      sampling,
    };
    let firstDeltaMs = null;
    const started = Date.now();
    const responses = await timed('generate', () => client.generate(request, opts('generate'), () => {
      if (firstDeltaMs === null) firstDeltaMs = Date.now() - started;
    }));

    // --- (d) checks -------------------------------------------------------------------------
    check(responses.length >= 1, 'Generate streamed no messages');
    const text = responses.map((r) => r.text).join('');
    const finals = responses.filter((r) => r.finish_reason !== 'FINISH_REASON_UNSPECIFIED');
    const withUsage = responses.filter((r) => r.usage);
    check(finals.length === 1, `Generate: expected exactly one message with a finish_reason, got ${finals.length}`);
    check(withUsage.length === 1, `Generate: expected exactly one message with usage, got ${withUsage.length}`);
    const last = responses[responses.length - 1];
    check(finals[0] === last && withUsage[0] === last, 'Generate: the finish_reason and usage must be on the last message');
    check(responses.every((r) => r.index === 0), 'Generate: n=1 but a message has index != 0');
    check(text.length > 0, `Generate: empty text after ${responses.length} messages`);
    const usage = last.usage;
    const completionIds = responses.reduce((n, r) => n + r.token_ids.length, 0);
    check(usage.completion_tokens >= 1 && usage.completion_tokens <= 12, `Generate: completion_tokens ${usage.completion_tokens} not in [1, 12]`);
    check(usage.completion_tokens === completionIds, `Generate: completion_tokens ${usage.completion_tokens} != ${completionIds} token ids streamed`);
    check(usage.total_tokens === usage.prompt_tokens + usage.completion_tokens, `Generate: total_tokens ${usage.total_tokens} != prompt + completion`);
    const mediaTokens = image.token_count + ts.token_count;
    check(usage.prompt_tokens > textOnlyUsage.prompt_tokens,
      `Generate: prompt_tokens ${usage.prompt_tokens} should exceed the text alone (${textOnlyUsage.prompt_tokens})`);
    check(usage.prompt_tokens >= textOnlyUsage.prompt_tokens + mediaTokens,
      `Generate: prompt_tokens ${usage.prompt_tokens} < text alone ${textOnlyUsage.prompt_tokens} + media tokens ${mediaTokens}`);
    check(usage.cached_media === 2, `Generate: cached_media ${usage.cached_media}, expected 2 (both parts from the store)`);
    check(last.finish_reason === 'FINISH_REASON_STOP' || last.finish_reason === 'FINISH_REASON_LENGTH', `Generate: odd finish_reason ${last.finish_reason}`);
    summary.generate = {
      text,
      messages: responses.length,
      finish_reason: last.finish_reason,
      usage,
      text_only_prompt_tokens: textOnlyUsage.prompt_tokens,
      media_tokens: mediaTokens,
      first_delta_ms: firstDeltaMs,
    };

    // --- (e) unknown uuid -> NOT_FOUND with rich details -----------------------------------
    summary.stage = 'not-found';
    const missing = `node-missing-${suffix}`;
    let failure = null;
    try {
      await timed('generate_not_found', () => client.generate({
        messages: [userMessage({ text: question }, { media: { modality: 'MODALITY_IMAGE', uuid: missing } })],
        sampling,
      }, opts('generate-not-found')));
    } catch (err) {
      failure = err;
    }
    check(failure !== null, `Generate with unknown uuid ${missing} succeeded; expected NOT_FOUND`);
    check(failure.code === grpc.status.NOT_FOUND, `Generate with unknown uuid: ${statusName(failure.code)} (${failure.details}), expected NOT_FOUND`);
    check(String(failure.details).includes(missing), `Generate NOT_FOUND details "${failure.details}" do not name ${missing}`);
    check(failure.responses.length === 0, `Generate NOT_FOUND came after ${failure.responses.length} messages; media errors must come first`);
    const rich = richStatus(failure);
    check(rich !== null, 'Generate NOT_FOUND: no grpc-status-details-bin trailer');
    check(rich.code === grpc.status.NOT_FOUND, `google.rpc.Status.code ${rich.code} != NOT_FOUND (5)`);
    check(rich.errorInfo !== null, `google.rpc.Status has no ErrorInfo (details: ${rich.details.join(', ')})`);
    check(rich.errorInfo.reason === 'EMBEDDING_NOT_FOUND', `ErrorInfo.reason ${rich.errorInfo.reason}, expected EMBEDDING_NOT_FOUND`);
    check(rich.errorInfo.domain === 'mmserve.dev', `ErrorInfo.domain ${rich.errorInfo.domain}, expected mmserve.dev`);
    check(String(rich.errorInfo.metadata.missing || '').split(',').includes(missing),
      `ErrorInfo.metadata.missing "${rich.errorInfo.metadata.missing}" does not list ${missing}`);
    check(rich.badRequest !== null && rich.badRequest.field_violations.length >= 1, 'google.rpc.Status has no BadRequest field violation');
    const violation = rich.badRequest.field_violations[0];
    check(violation.field.startsWith('messages[0].content[1]'), `BadRequest field ${violation.field}, expected messages[0].content[1]...`);
    summary.not_found = {
      uuid: missing,
      code: statusName(failure.code),
      details: failure.details,
      error_info: rich.errorInfo,
      bad_request: rich.badRequest,
    };

    // --- cleanup --------------------------------------------------------------------------------
    if (!args.keep) {
      summary.stage = 'cleanup';
      for (const id of [imageUuid, seriesUuid]) {
        const deleted = await timed(`delete_${id === imageUuid ? 'image' : 'time_series'}`,
          () => client.deleteEmbedding(id, opts(id === imageUuid ? 'delete-image' : 'delete-time-series')));
        check(deleted.deleted === true, `DeleteEmbedding(${id}) deleted nothing`);
      }
      summary.deleted = [imageUuid, seriesUuid];
    }
    delete summary.stage;
  } catch (err) {
    // Best effort: leave nothing behind when a check failed half-way.
    if (!args.keep && summary.image) {
      await Promise.allSettled([summary.image.id, summary.time_series && summary.time_series.id]
        .filter(Boolean).map((id) => client.deleteEmbedding(id, { requestId: `${base}-cleanup`, timeoutMs: 5000 })));
    }
    throw err;
  } finally {
    client.close();
  }
}

function describe(err) {
  if (err instanceof CheckFailed || (err && /^could not connect/.test(err.message))) return err.message;
  if (err && typeof err.code === 'number' && 'details' in err) {
    const rich = richStatus(err);
    const extra = rich && rich.errorInfo ? ` [${rich.errorInfo.reason}]` : '';
    return `gRPC ${statusName(err.code)}: ${err.details}${extra}`;
  }
  return err && err.stack ? err.stack : String(err);
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`smoke: ${err.message}\n${USAGE}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const summary = { ok: false, encoder: args.encoder, decoder: args.decoder };
  const start = Date.now();
  try {
    await run(args, summary);
    summary.ok = true;
  } catch (err) {
    summary.error = describe(err);
    process.stderr.write(`smoke: FAILED at ${summary.stage}: ${summary.error}\n`);
  }
  summary.total_ms = Date.now() - start;
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  return summary.ok ? 0 : 1;
}

main().then((code) => {
  process.exitCode = code;
});
