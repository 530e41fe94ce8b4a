// A certified OpenID provider (npm `oidc-provider`) set up as the device agent's outside peer.
//
// Why a real provider: our simulated Entra ID is written by us, so passing against it proves
// little. This one speaks the device authorization grant (RFC 8628) its own way: it sends
// verification_uri_complete, no interval and no message, and rotates refresh tokens.
//
//   node provider.mjs --cert server.pem --key server.key [--port 0] [--client-id ID]
//                     [--access-ttl 3600] [--device-ttl 600] [--app-jwks FILE]
//
// --app-jwks adds a confidential client "<client-id>-app" for the certificate flow (client
// credentials, private_key_jwt: RFC 7523 assertions checked against FILE's public keys).
//
// Serves HTTPS on 127.0.0.1 only, with the issuer mounted under /oidc (MSAL wants a path
// segment). Prints one JSON line to stdout once listening: {"issuer", "port", ...}.
// Loopback-only admin endpoints, outside the issuer:
//   POST /admin/revoke-all   destroy every grant with its refresh/access tokens (as an admin would)
//   GET  /admin/events       what the provider did (event names and ids, never token values)
// Sign-in uses oidc-provider's devInteractions: any login name is accepted, the password is
// not checked (it is a development feature of the provider, not ours).

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    cert: { type: 'string' },
    key: { type: 'string' },
    'client-id': { type: 'string', default: 'device-agent-interop' },
    resource: { type: 'string', default: 'api://telemetry' },
    scope: { type: 'string', default: 'Readings.Write' },
    'access-ttl': { type: 'string', default: '3600' },
    'device-ttl': { type: 'string', default: '600' },
    'app-jwks': { type: 'string' },
  },
});

if (!args.cert || !args.key) {
  process.stderr.write('usage: node provider.mjs --cert PEM --key PEM [--port N]\n');
  process.exit(2);
}
if (!['127.0.0.1', 'localhost', '::1'].includes(args.host)) {
  process.stderr.write(`refusing to listen on ${args.host}: loopback only\n`);
  process.exit(2);
}

const MOUNT = '/oidc';
const RESOURCE = args.resource;
const SCOPE = args.scope;
const ACCESS_TTL_S = Number(args['access-ttl']);
const DEVICE_TTL_S = Number(args['device-ttl']);
const APP_JWKS = args['app-jwks'] ? JSON.parse(readFileSync(args['app-jwks'], 'utf8')) : null;

// One RSA key per run: access tokens and id tokens are RS256 JWTs verifiable through the JWKS.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };

const events = [];
const grantIds = new Set();

function record(name, detail) {
  events.push({ event: name, at: Date.now() / 1000, ...detail });
  if (events.length > 1000) events.shift();
}

function configuration() {
  return {
    clients: [{
      client_id: args['client-id'],
      client_name: 'device-agent (interop)',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: [],
      redirect_uris: [],
    }, ...(APP_JWKS ? [{
      client_id: `${args['client-id']}-app`,
      client_name: 'device-agent (interop, certificate)',
      application_type: 'web',
      token_endpoint_auth_method: 'private_key_jwt',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      jwks: APP_JWKS,
    }] : [])],
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    scopes: ['openid', 'offline_access'],
    claims: { openid: ['sub'] },
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      clientCredentials: { enabled: Boolean(APP_JWKS) },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // MSAL never sends `resource`: a default one makes plain scope requests get JWTs.
        defaultResource: async (_ctx, _client, oneOf) => oneOf ?? RESOURCE,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, indicator) => {
          if (indicator !== RESOURCE) throw new errors.InvalidTarget();
          return {
            scope: SCOPE,
            audience: RESOURCE,
            accessTokenTTL: ACCESS_TTL_S,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    // Refresh tokens for offline_access (the default policy, spelled out) and rotated on
    // every use: replaying a used one revokes the whole grant.
    issueRefreshToken: async (_ctx, client, source) => client.grantTypeAllowed('refresh_token')
      && source.scopes.has('offline_access'),
    rotateRefreshToken: () => true,
    ttl: {
      AccessToken: ACCESS_TTL_S,
      DeviceCode: DEVICE_TTL_S,
      IdToken: 3600,
      Grant: 14 * 24 * 3600,
      Interaction: 600,
      RefreshToken: 14 * 24 * 3600,
      Session: 24 * 3600,
    },
    findAccount: async (_ctx, sub) => ({
      accountId: sub,
      claims: async () => ({ sub }),
    }),
  };
}

const EVENTS = [
  'device_authorization.success', 'device_authorization.error',
  'grant.success', 'grant.error', 'grant.revoked', 'grant.saved', 'grant.destroyed',
  'refresh_token.saved', 'refresh_token.consumed', 'refresh_token.destroyed',
  'access_token.issued', 'device_code.consumed', 'server_error',
];

// Event arguments reduced to names and ids: token values never leave the provider.
function describe(name, eventArgs) {
  const detail = {};
  for (const arg of eventArgs) {
    if (arg instanceof Error) {
      detail.error = arg.error || arg.name;
      detail.error_description = arg.error_description || arg.message;
      if (arg.error_detail) detail.error_detail = arg.error_detail;   // why (e.g. a replayed jti)
    } else if (arg && typeof arg === 'object' && 'kind' in arg) {
      if (arg.grantId) detail.grant = arg.grantId;
      if (arg.kind === 'Grant') detail.grant = arg.jti;
      if (arg.kind === 'RefreshToken' && arg.rotations !== undefined) detail.rotations = arg.rotations;
    } else if (arg && typeof arg === 'object' && arg.oidc?.params?.grant_type) {
      detail.grant_type = arg.oidc.params.grant_type;
    } else if (typeof arg === 'string' && name === 'grant.revoked') {
      detail.grant = arg;
    }
  }
  return detail;
}

let provider; // built once the port is known: the issuer contains it
let callback;

function buildProvider(issuer) {
  provider = new Provider(issuer, configuration());
  for (const name of EVENTS) {
    provider.on(name, (...eventArgs) => {
      const detail = describe(name, eventArgs);
      if (name === 'grant.saved' && detail.grant) grantIds.add(detail.grant);
      record(name, detail);
      if (name === 'server_error') process.stderr.write(`oidc-provider server_error: ${detail.error_description}\n`);
    });
  }
  callback = provider.callback();
}

async function revokeAll() {
  let count = 0;
  for (const grantId of grantIds) {
    await Promise.all([
      provider.AccessToken.revokeByGrantId(grantId),
      provider.RefreshToken.revokeByGrantId(grantId),
      provider.DeviceCode.revokeByGrantId(grantId),
      provider.Grant.adapter.destroy(grantId),
    ]);
    record('admin.revoked', { grant: grantId });
    count += 1;
  }
  grantIds.clear();
  return count;
}

function sendJson(res, status, body) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': data.length, 'cache-control': 'no-store' });
  res.end(data);
}

const server = createServer({ cert: readFileSync(args.cert), key: readFileSync(args.key) }, (req, res) => {
  const path = req.url.split('?')[0];
  if (path === MOUNT || path.startsWith(`${MOUNT}/`)) {
    // Mounting as express/koa-mount do: the provider derives its mount path from originalUrl.
    req.originalUrl = req.url;
    req.url = req.url.slice(MOUNT.length) || '/';
    callback(req, res);
  } else if (path === '/admin/revoke-all' && req.method === 'POST') {
    revokeAll().then((n) => sendJson(res, 200, { revoked: n }), (err) => sendJson(res, 500, { error: String(err) }));
  } else if (path === '/admin/events' && req.method === 'GET') {
    sendJson(res, 200, { events });
  } else {
    sendJson(res, 404, { error: 'not_found' });
  }
});

server.listen(Number(args.port), args.host, () => {
  const { port } = server.address();
  const hostPart = args.host.includes(':') ? `[${args.host}]` : args.host;
  const issuer = `https://${hostPart}:${port}${MOUNT}`;
  buildProvider(issuer);
  process.stdout.write(`${JSON.stringify({
    issuer,
    port,
    client_id: args['client-id'],
    resource: RESOURCE,
    scope: SCOPE,
    oidc_provider: 'oidc-provider',
    node: process.versions.node,
  })}\n`);
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
