'use strict';
// A small Node.js client for the mmserve gRPC contract.
//
// The .proto files are loaded at run time, straight from the repository's
// protos/ folder (no generated code): whatever the contract says is what this
// client speaks. google.rpc.Status / ErrorInfo / BadRequest (the rich error
// details servers put in the `grpc-status-details-bin` trailer) come from the
// small vendored copies under ./proto.

const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** The repository's protos/ folder (this file lives in clients/node/). */
const PROTOS_DIR = path.resolve(__dirname, '..', '..', 'protos');
/** Vendored google/rpc protos (status.proto, error_details.proto). */
const VENDORED_DIR = path.resolve(__dirname, 'proto');

/** The servers' default message limit (MMSERVE_GRPC_MAX_MESSAGE_BYTES, 80 MiB). */
const DEFAULT_MAX_MESSAGE_BYTES = 80 * 1024 * 1024;

/** The status details trailer (a serialized google.rpc.Status). */
const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

/** How messages look in JavaScript: proto field names, enums as names, int64 as numbers. */
const LOADER_OPTIONS = {
  keepCase: true, // field names as written in the .proto files (snake_case)
  longs: Number, // int64 token counts and shapes are small; plain numbers are easiest
  enums: String, // "MODALITY_IMAGE", "FINISH_REASON_STOP", ...
  defaults: true, // unset scalars come back as their zero values
  oneofs: true, // a virtual field names the member of each oneof that is set
};

/**
 * Loads the mmserve contract from protos/ and returns the grpc-js package object
 * (pkg.mmserve.encoder.v1.EncoderService, pkg.mmserve.decoder.v1.DecoderService, ...).
 */
function loadContract(protosDir = PROTOS_DIR) {
  const files = [
    'mmserve/encoder/v1/encoder_service.proto',
    'mmserve/decoder/v1/decoder_service.proto',
  ];
  // google/protobuf/timestamp.proto is bundled with proto-loader (protobufjs).
  const definition = protoLoader.loadSync(files, { ...LOADER_OPTIONS, includeDirs: [protosDir] });
  return grpc.loadPackageDefinition(definition);
}

let statusType = null;

/** The google.rpc.Status message type, with Any details expanded to ErrorInfo / BadRequest. */
function googleRpcStatus() {
  if (statusType === null) {
    const definition = protoLoader.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], {
      ...LOADER_OPTIONS,
      longs: String,
      json: true, // google.protobuf.Any -> {"@type": "type.googleapis.com/google.rpc.ErrorInfo", ...fields}
      includeDirs: [VENDORED_DIR],
    });
    statusType = definition['google.rpc.Status'];
  }
  return statusType;
}

/**
 * Decodes the rich error details of a failed call (a grpc-js ServiceError).
 * Returns {code, message, errorInfo, badRequest, details} or null when the
 * server sent no `grpc-status-details-bin` trailer.
 */
function richStatus(err) {
  const values = err && err.metadata ? err.metadata.get(STATUS_DETAILS_KEY) : [];
  if (!values || values.length === 0) return null;
  const raw = Buffer.isBuffer(values[0]) ? values[0] : Buffer.from(String(values[0]), 'base64');
  const status = googleRpcStatus().deserialize(raw);
  const details = status.details || [];
  const typeName = (d) => String(d['@type'] || d.type_url || '').split('/').pop();
  const strip = (d) => {
    const out = { ...d };
    delete out['@type'];
    return out;
  };
  const errorInfo = details.find((d) => typeName(d) === 'google.rpc.ErrorInfo');
  const badRequest = details.find((d) => typeName(d) === 'google.rpc.BadRequest');
  return {
    code: status.code,
    message: status.message,
    errorInfo: errorInfo ? strip(errorInfo) : null,
    badRequest: badRequest ? strip(badRequest) : null,
    details: details.map(typeName),
  };
}

/** The name of a numeric gRPC status code (5 -> "NOT_FOUND"). */
function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

/** A request id for `x-request-id` (the servers log it on every line of the request). */
function newRequestId(prefix = 'node') {
  return `${prefix}-${crypto.randomBytes(8).toString('hex')}`;
}

/** Channel options: message limits raised to match the servers (both directions). */
function channelOptions(maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES) {
  return {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
  };
}

/**
 * Encoder and decoder clients with promise-returning calls. Every call takes
 * {requestId, timeoutMs}: the request id goes out as `x-request-id` metadata
 * and timeoutMs becomes the call's deadline.
 */
class MmserveClient {
  constructor({ encoder, decoder, maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES, timeoutMs = 60000, contract = loadContract() }) {
    const credentials = grpc.credentials.createInsecure();
    const options = channelOptions(maxMessageBytes);
    this.timeoutMs = timeoutMs;
    this.encoder = encoder ? new contract.mmserve.encoder.v1.EncoderService(encoder, credentials, options) : null;
    this.decoder = decoder ? new contract.mmserve.decoder.v1.DecoderService(decoder, credentials, options) : null;
  }

  _callArgs({ requestId, timeoutMs } = {}) {
    const metadata = new grpc.Metadata();
    metadata.set('x-request-id', requestId || newRequestId());
    return [metadata, { deadline: Date.now() + (timeoutMs || this.timeoutMs) }];
  }

  _unary(client, method, request, opts) {
    if (!client) throw new Error(`no target configured for ${method}`);
    const [metadata, callOptions] = this._callArgs(opts);
    return new Promise((resolve, reject) => {
      client[method](request, metadata, callOptions, (err, response) => (err ? reject(err) : resolve(response)));
    });
  }

  /** Waits until both channels are connected (or the deadline passes). */
  waitForReady(timeoutMs = this.timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    const ready = (client, name) => new Promise((resolve, reject) => {
      if (!client) return resolve();
      client.waitForReady(deadline, (err) => (err
        ? reject(new Error(`could not connect to the ${name} at ${client.getChannel().getTarget()} within ${timeoutMs} ms: ${err.message}`))
        : resolve()));
    });
    return Promise.all([ready(this.encoder, 'encoder'), ready(this.decoder, 'decoder')]);
  }

  encode(items, opts) {
    return this._unary(this.encoder, 'Encode', { items }, opts);
  }

  getEmbedding(id, opts, includeTensors = false) {
    return this._unary(this.encoder, 'GetEmbedding', { id, include_tensors: includeTensors }, opts);
  }

  deleteEmbedding(id, opts) {
    return this._unary(this.encoder, 'DeleteEmbedding', { id }, opts);
  }

  getModelInfo(opts) {
    return this._unary(this.encoder, 'GetModelInfo', {}, opts);
  }

  listModels(opts) {
    return this._unary(this.decoder, 'ListModels', {}, opts);
  }

  /**
   * Streams DecoderService.Generate. Resolves with every response message, in
   * order, once the stream ends OK; rejects with the grpc-js ServiceError
   * (err.code, err.details, err.metadata = trailers) otherwise, with
   * err.responses holding whatever arrived before the error.
   */
  generate(request, opts, onMessage = null) {
    if (!this.decoder) throw new Error('no decoder target configured');
    const [metadata, callOptions] = this._callArgs(opts);
    return new Promise((resolve, reject) => {
      const responses = [];
      let settled = false;
      const call = this.decoder.Generate(request, metadata, callOptions);
      call.on('data', (message) => {
        responses.push(message);
        if (onMessage) onMessage(message);
      });
      call.on('error', (err) => {
        if (settled) return;
        settled = true;
        err.responses = responses;
        reject(err);
      });
      call.on('end', () => {
        if (settled) return;
        settled = true;
        resolve(responses);
      });
    });
  }

  close() {
    if (this.encoder) this.encoder.close();
    if (this.decoder) this.decoder.close();
  }
}

/** A float32 tensor (raw little-endian bytes, row-major) from nested rows [[...], ...] or a flat array + shape. */
function float32Tensor(values, shape) {
  const flat = Array.isArray(values[0]) ? values.flat() : values;
  const dims = shape || (Array.isArray(values[0]) ? [values.length, values[0].length] : [values.length]);
  const expected = dims.reduce((a, b) => a * b, 1);
  if (flat.length !== expected) throw new Error(`tensor has ${flat.length} values, shape ${JSON.stringify(dims)} needs ${expected}`);
  const data = Buffer.alloc(flat.length * 4);
  flat.forEach((v, i) => data.writeFloatLE(v, i * 4));
  return { dtype: 'DATA_TYPE_FLOAT32', shape: dims, data };
}

module.exports = {
  DEFAULT_MAX_MESSAGE_BYTES,
  PROTOS_DIR,
  STATUS_DETAILS_KEY,
  MmserveClient,
  channelOptions,
  float32Tensor,
  grpc,
  loadContract,
  newRequestId,
  richStatus,
  statusName,
};
