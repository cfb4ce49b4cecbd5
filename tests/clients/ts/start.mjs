#!/usr/bin/env node
// Starts a GreetingWorkflow through a given address with the TypeScript client
// (@temporalio/client, grpc-js) and waits for its result.
//
// Usage:
//   node start.mjs --address HOST:PORT --task-queue TQ [--namespace NS]
//                  [--workflow-id ID] [--name NAME] [--timeout SECONDS]
//                  [--ca CA.pem [--cert CLIENT.pem --key CLIENT.key]] [--server-name NAME]
//
// Prints one JSON line: {"ok": true, "result": ...} (exit 0) or
// {"ok": false, "error": ...} (exit 1).
import { readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { Connection, Client } from '@temporalio/client';

const FLAGS = new Set([
  'address', 'namespace', 'task-queue', 'workflow-id', 'name', 'timeout',
  'ca', 'cert', 'key', 'server-name',
]);

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument: ${a}`);
    let key = a.slice(2);
    let value;
    const eq = key.indexOf('=');
    if (eq >= 0) {
      value = key.slice(eq + 1);
      key = key.slice(0, eq);
    } else {
      if (i + 1 >= argv.length) throw new Error(`missing value for --${key}`);
      value = argv[++i];
    }
    if (!FLAGS.has(key)) throw new Error(`unknown flag: --${key}`);
    out[key] = value;
  }
  if (!out.address) throw new Error('--address is required');
  if (!out['task-queue']) throw new Error('--task-queue is required');
  if ((out.cert || out.key) && !out.ca) throw new Error('--cert/--key require --ca');
  if (Boolean(out.cert) !== Boolean(out.key)) throw new Error('--cert and --key go together');
  return {
    address: out.address,
    namespace: out.namespace ?? 'default',
    taskQueue: out['task-queue'],
    workflowId: out['workflow-id'] ?? `ts-greeting-${randomUUID()}`,
    name: out.name ?? 'TypeScript',
    timeoutMs: Math.round(1000 * Number(out.timeout ?? 60)),
    ca: out.ca,
    cert: out.cert,
    key: out.key,
    serverName: out['server-name'],
  };
}

function emit(obj, code) {
  process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
}

function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms (${what})`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

async function run(opts) {
  const connOpts = { address: opts.address, connectTimeout: Math.min(opts.timeoutMs, 15000) };
  if (opts.ca) {
    const tls = { serverRootCACertificate: readFileSync(opts.ca) };
    if (opts.serverName) tls.serverNameOverride = opts.serverName;
    if (opts.cert) tls.clientCertPair = { crt: readFileSync(opts.cert), key: readFileSync(opts.key) };
    connOpts.tls = tls;
  }
  const connection = await Connection.connect(connOpts);
  try {
    const client = new Client({ connection, namespace: opts.namespace });
    const handle = await client.workflow.start('GreetingWorkflow', {
      args: [opts.name],
      taskQueue: opts.taskQueue,
      workflowId: opts.workflowId,
      workflowExecutionTimeout: opts.timeoutMs,
    });
    const result = await handle.result();
    return { workflowId: opts.workflowId, runId: handle.firstExecutionRunId, result };
  } finally {
    await connection.close().catch(() => {});
  }
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  process.stderr.write(`usage error: ${e.message}\n`);
  emit({ ok: false, error: `usage: ${e.message}` }, 2);
}
if (opts) {
  try {
    const out = await withTimeout(run(opts), opts.timeoutMs, 'start+result');
    emit({ ok: true, ...out }, 0);
  } catch (e) {
    process.stderr.write(`${e?.stack ?? e}\n`);
    emit({ ok: false, error: String(e?.message ?? e) }, 1);
  }
}
