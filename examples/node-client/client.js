#!/usr/bin/env node
// Calls modelhost from Node.js with nothing but the .proto files, loaded at run time:
// uploads a checkpoint in chunks, loads it as a model, runs a prediction.
//
//   node client.js --target 127.0.0.1:50051 --checkpoint weights.pt --name mlp \
//       --architecture tiny_mlp --input input.json
//
// Prints one JSON object on stdout. Copy the functions you need: loadService,
// connect, saveCheckpoint, loadModel, predict, encodeTensor and decodeTensor
// depend on nothing but @grpc/grpc-js and @grpc/proto-loader.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The repository's protos/, unless --protos or $MODELHOST_PROTOS says otherwise.
const DEFAULT_PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const DEFAULT_CHUNK_BYTES = 1 << 20;
const MAX_MESSAGE_BYTES = 256 << 20; // the server's default max_message_bytes

// ---------------------------------------------------------------------------
// Connecting

/** The ModelHost service constructor, from modelhost/v1/modelhost.proto under `protoDir`. */
function loadService(protoDir = process.env.MODELHOST_PROTOS || DEFAULT_PROTOS) {
  const definition = protoLoader.loadSync(path.join(protoDir, 'modelhost', 'v1', 'modelhost.proto'), {
    keepCase: true, // field names as in the proto: size_bytes, architecture_args
    longs: String, // int64 fields arrive as decimal strings (no precision loss)
    enums: String, // enum values arrive as their names: "DATA_TYPE_FLOAT32"
    bytes: Buffer,
    defaults: true, // unset fields arrive with their default values
    oneofs: true, // a oneof's name tells which member is set
    // Imports resolve under protoDir; google/protobuf/timestamp.proto ships with proto-loader.
    includeDirs: [protoDir],
  });
  return grpc.loadPackageDefinition(definition).modelhost.v1.ModelHost;
}

/**
 * A ModelHost client for `target` ("host:port"). `token`, when given, goes with every call
 * as `authorization: Bearer <token>`. `ca` (PEM bytes) or `tls: true` use TLS.
 */
function connect(target, { token, tls = false, ca, protoDir } = {}) {
  const ModelHost = loadService(protoDir);
  const credentials = tls || ca ? grpc.credentials.createSsl(ca || null) : grpc.credentials.createInsecure();
  const client = new ModelHost(target, credentials, {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  });
  // Metadata rather than call credentials: grpc-js only sends those over TLS, and the
  // server also accepts tokens on plaintext loopback connections.
  client.metadata = () => {
    const metadata = new grpc.Metadata();
    if (token) metadata.set('authorization', `Bearer ${token}`);
    return metadata;
  };
  return client;
}

function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

/** Calls a unary RPC; resolves with the reply, rejects with the grpc error (.code, .details). */
function unary(client, method, request, { timeout = 60 } = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, client.metadata(), deadline(timeout), (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

// ---------------------------------------------------------------------------
// Checkpoints

async function sha256File(file) {
  const hash = crypto.createHash('sha256');
  for await (const block of fs.createReadStream(file)) hash.update(block);
  return hash.digest('hex');
}

/**
 * Uploads `file` as checkpoint `name` with the client-streaming SaveCheckpoint RPC: a header
 * first (with the size and sha256, which the server checks), then the bytes in chunks of
 * `chunkBytes`. Resolves with the CheckpointInfo and the number of chunks sent.
 */
async function saveCheckpoint(client, name, file, options = {}) {
  const { chunkBytes = DEFAULT_CHUNK_BYTES, overwrite = false, metadata = {}, timeout = 600 } = options;
  const size = (await fs.promises.stat(file)).size;
  const sha256 = await sha256File(file);
  let chunks = 0;
  const info = await new Promise((resolve, reject) => {
    const call = client.SaveCheckpoint(client.metadata(), deadline(timeout), (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
    const send = async () => {
      call.write({ header: { name, overwrite, metadata, upload: { size_bytes: size, sha256 } } });
      for await (const chunk of fs.createReadStream(file, { highWaterMark: chunkBytes })) {
        chunks += 1;
        if (!call.write({ chunk })) await new Promise((drained) => call.once('drain', drained));
      }
      call.end();
    };
    send().catch((error) => {
      call.cancel();
      reject(error);
    });
  });
  if (info.sha256 !== sha256) {
    throw new Error(`checkpoint ${name}: server stored sha256 ${info.sha256}, sent ${sha256}`);
  }
  return { info, chunks };
}

// ---------------------------------------------------------------------------
// Models

/**
 * Loads checkpoint `checkpoint` into `architecture` and serves it as `name`. `architectureArgs`
 * is a plain object; each value is sent as the JSON literal the server expects.
 */
function loadModel(client, { name, architecture, checkpoint, architectureArgs = {}, device = '' }, options) {
  const architecture_args = {};
  for (const [key, value] of Object.entries(architectureArgs)) architecture_args[key] = JSON.stringify(value);
  return unary(client, 'LoadModel', { name, architecture, checkpoint, architecture_args, device }, options);
}

// ---------------------------------------------------------------------------
// Tensors: raw little-endian bytes in C order (see `message Tensor` in the proto)

const DTYPES = {
  DATA_TYPE_FLOAT32: { size: 4, get: (v, o) => v.getFloat32(o, true), set: (v, o, x) => v.setFloat32(o, x, true) },
  DATA_TYPE_FLOAT64: { size: 8, get: (v, o) => v.getFloat64(o, true), set: (v, o, x) => v.setFloat64(o, x, true) },
  DATA_TYPE_FLOAT16: { size: 2, get: (v, o) => float16(v.getUint16(o, true)) },
  // bfloat16 is the upper half of a float32.
  DATA_TYPE_BFLOAT16: { size: 2, get: (v, o) => new Float32Array(new Uint32Array([v.getUint16(o, true) << 16]).buffer)[0] },
  DATA_TYPE_UINT8: { size: 1, get: (v, o) => v.getUint8(o), set: (v, o, x) => v.setUint8(o, x) },
  DATA_TYPE_INT8: { size: 1, get: (v, o) => v.getInt8(o), set: (v, o, x) => v.setInt8(o, x) },
  DATA_TYPE_INT16: { size: 2, get: (v, o) => v.getInt16(o, true), set: (v, o, x) => v.setInt16(o, x, true) },
  DATA_TYPE_INT32: { size: 4, get: (v, o) => v.getInt32(o, true), set: (v, o, x) => v.setInt32(o, x, true) },
  // int64 values beyond 2^53 would lose precision as numbers: they are returned as strings.
  DATA_TYPE_INT64: {
    size: 8,
    get: (v, o) => {
      const x = v.getBigInt64(o, true);
      return Number.isSafeInteger(Number(x)) ? Number(x) : x.toString();
    },
    set: (v, o, x) => v.setBigInt64(o, BigInt(x), true),
  },
  DATA_TYPE_BOOL: { size: 1, get: (v, o) => v.getUint8(o) !== 0, set: (v, o, x) => v.setUint8(o, x ? 1 : 0) },
};

function float16(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** "float32" or "DATA_TYPE_FLOAT32" -> "DATA_TYPE_FLOAT32". */
function dtypeName(dtype) {
  const name = String(dtype).toUpperCase();
  return name.startsWith('DATA_TYPE_') ? name : `DATA_TYPE_${name}`;
}

/** A Tensor message from a flat array of `values` (C order), its shape and dtype. */
function encodeTensor(values, shape, dtype = 'float32') {
  const name = dtypeName(dtype);
  const type = DTYPES[name];
  if (!type || !type.set) throw new Error(`cannot encode dtype ${dtype}`);
  const count = shape.reduce((a, b) => a * b, 1);
  if (values.length !== count) throw new Error(`shape [${shape}] needs ${count} values, got ${values.length}`);
  const data = Buffer.alloc(count * type.size);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  for (let i = 0; i < count; i++) type.set(view, i * type.size, values[i]);
  return { dtype: name, shape, data };
}

/** { dtype, shape, values } from a Tensor message: values flat, in C order. */
function decodeTensor(tensor) {
  const type = DTYPES[tensor.dtype];
  if (!type) throw new Error(`unknown dtype ${tensor.dtype}`);
  const shape = tensor.shape.map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const data = tensor.data;
  if (data.length !== count * type.size) {
    throw new Error(`tensor of shape [${shape}] ${tensor.dtype}: ${data.length} bytes`);
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const values = new Array(count);
  for (let i = 0; i < count; i++) values[i] = type.get(view, i * type.size);
  return { dtype: tensor.dtype, shape, values };
}

/**
 * Runs model `model` on `inputs` (name -> Tensor message, see encodeTensor). Resolves with
 * { model, version, outputs: name -> { dtype, shape, values } }.
 */
async function predict(client, model, inputs, options) {
  const reply = await unary(client, 'Predict', { model, inputs }, options);
  const outputs = {};
  for (const [name, tensor] of Object.entries(reply.outputs)) outputs[name] = decodeTensor(tensor);
  return { model: reply.model, version: Number(reply.version), outputs };
}

// ---------------------------------------------------------------------------
// Command line

const USAGE = `usage: node client.js --target HOST:PORT [options]
  --checkpoint FILE           upload FILE (torch.save or safetensors) in chunks
  --checkpoint-name NAME      store it under NAME (default: --name)
  --chunk-bytes N             upload chunk size (default ${DEFAULT_CHUNK_BYTES})
  --overwrite                 replace a stored checkpoint of the same name
  --name NAME                 model name to load as and predict with
  --architecture ARCH         load the checkpoint into ARCH (see ListArchitectures)
  --architecture-args JSON    builder arguments, e.g. '{"num_classes": 10}'
  --device DEVICE             "cpu", "cuda:0", ... (default: the server's)
  --input JSON|FILE           predict: a nested array (float32, one input), or
                              {"NAME": {"dtype": "float32", "shape": [...], "data": [...]}}
  --unknown-model NAME        also call Predict on NAME and report its status (NOT_FOUND)
  --token TOKEN               send 'authorization: Bearer TOKEN' (or $MODELHOST_TOKEN)
  --tls, --ca FILE            use TLS (--ca: the server's CA certificate, PEM)
  --protos DIR                the protos/ directory (or $MODELHOST_PROTOS)
  --timeout SECONDS           deadline of each call (default 60)`;

const FLAGS = new Set(['overwrite', 'tls', 'help']);

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    const match = /^--([a-z0-9-]+)(?:=(.*))?$/.exec(argv[i]);
    if (!match) throw new Error(`unexpected argument ${argv[i]}\n${USAGE}`);
    const key = match[1];
    if (FLAGS.has(key)) args[key] = true;
    else if (match[2] !== undefined) args[key] = match[2];
    else if (i + 1 < argv.length) args[key] = argv[++i];
    else throw new Error(`--${key} needs a value`);
  }
  return args;
}

function shapeOf(nested) {
  const shape = [];
  for (let level = nested; Array.isArray(level); level = level[0]) shape.push(level.length);
  return shape;
}

/** --input: inline JSON or a JSON file, as Tensor messages by input name. */
function readInputs(argument) {
  const text = /^\s*[[{]/.test(argument) ? argument : fs.readFileSync(argument, 'utf8');
  const parsed = JSON.parse(text);
  const named = Array.isArray(parsed) ? { input: parsed } : parsed;
  const inputs = {};
  for (const [name, spec] of Object.entries(named)) {
    if (Array.isArray(spec)) inputs[name] = encodeTensor(spec.flat(Infinity), shapeOf(spec), 'float32');
    else inputs[name] = encodeTensor(spec.data.flat(Infinity), spec.shape ?? shapeOf(spec.data), spec.dtype ?? 'float32');
  }
  return inputs;
}

function describeError(error) {
  return { code: error.code, status: grpc.status[error.code] ?? 'UNKNOWN', details: error.details ?? error.message };
}

async function main(argv) {
  const args = parseArgs(argv);
  if (args.help || !args.target) {
    console.error(USAGE);
    return args.help ? 0 : 2;
  }
  const options = { timeout: Number(args.timeout ?? 60) };
  const client = connect(args.target, {
    token: args.token ?? process.env.MODELHOST_TOKEN,
    tls: args.tls,
    ca: args.ca ? fs.readFileSync(args.ca) : undefined,
    protoDir: args.protos,
  });
  const result = {};
  try {
    const checkpoint = args['checkpoint-name'] ?? args.name;
    if (args.checkpoint) {
      const { info, chunks } = await saveCheckpoint(client, checkpoint, args.checkpoint, {
        chunkBytes: Number(args['chunk-bytes'] ?? DEFAULT_CHUNK_BYTES),
        overwrite: Boolean(args.overwrite),
      });
      result.checkpoint = {
        name: info.name,
        size_bytes: Number(info.size_bytes),
        sha256: info.sha256,
        format: info.format,
        tensor_count: Number(info.tensor_count),
        chunks,
      };
    }
    if (args.architecture) {
      const info = await loadModel(
        client,
        {
          name: args.name,
          architecture: args.architecture,
          checkpoint,
          architectureArgs: args['architecture-args'] ? JSON.parse(args['architecture-args']) : {},
          device: args.device ?? '',
        },
        { timeout: Math.max(options.timeout, 600) },
      );
      result.model = {
        name: info.name,
        version: Number(info.version),
        state: info.state,
        device: info.device,
        dtype: info.dtype,
        parameter_count: Number(info.parameter_count),
      };
    }
    if (args.input) {
      result.prediction = await predict(client, args.name, readInputs(args.input), options);
    }
    if (args['unknown-model']) {
      try {
        await predict(client, args['unknown-model'], readInputs(args.input ?? '[[0]]'), options);
        result.unknown_model = { name: args['unknown-model'], code: 0, status: 'OK' };
      } catch (error) {
        result.unknown_model = { name: args['unknown-model'], ...describeError(error) };
      }
    }
  } catch (error) {
    if (typeof error.code !== 'number') throw error; // not a gRPC status
    console.log(JSON.stringify({ ...result, error: describeError(error) }));
    return 1;
  } finally {
    client.close();
  }
  console.log(JSON.stringify(result));
  return 0;
}

module.exports = { loadService, connect, saveCheckpoint, loadModel, predict, encodeTensor, decodeTensor, main };

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (error) => {
      console.error(error.stack || String(error));
      process.exitCode = 1;
    },
  );
}
