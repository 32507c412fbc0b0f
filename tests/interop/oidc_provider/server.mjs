// An independent, OpenID-certified authorization server (panva/oidc-provider) configured as a FAPI 2.0 bank would
// be, for tests/interop/test_oidc_provider.py. Not part of the product.
//
//   node server.mjs SETTINGS.json
//
// SETTINGS.json (written by the test): {"cert", "key", "ca": PEM file paths; "host"; "resource": the API's resource
// indicator; "scopes": the API's scopes; "authorization_details_types"}. Once listening it prints one JSON line on
// stdout, {"issuer": "https://host:port"}, and reads one line on stdin: the path of a JSON file with the one static
// client's metadata (the agent, configured with that issuer, publishes its JWKS only once it runs). Then it prints
// {"ready": true}. Everything it refuses is logged on stderr, one JSON line per refusal, so a failing test shows the
// authorization server's own reason.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as readline from 'node:readline';

import Provider from 'oidc-provider';

const settings = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

// requestCert without rejectUnauthorized: the browser's front channel has no certificate, the agent's back channel
// has one from the test CA (socket.authorized), and only a verified one is handed to oidc-provider.
const server = https.createServer({
  cert: fs.readFileSync(settings.cert),
  key: fs.readFileSync(settings.key),
  ca: fs.readFileSync(settings.ca),
  requestCert: true,
  rejectUnauthorized: false,
  minVersion: 'TLSv1.2',
});

server.listen(0, settings.host, () => {
  const { port } = server.address();
  const issuer = `https://${settings.host}:${port}`;
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
  const lines = readline.createInterface({ input: process.stdin });
  lines.once('line', (path) => {
    lines.close();
    serve(issuer, JSON.parse(fs.readFileSync(path.trim(), 'utf8')));
  });
});

function serve(issuer, client) {
  const provider = new Provider(issuer, configuration(client));
  provider.proxy = false;
  for (const event of ['server_error', 'authorization.error', 'pushed_authorization_request.error',
    'grant.error', 'introspection.error', 'userinfo.error', 'jwks.error', 'discovery.error']) {
    provider.on(event, (...args) => {
      const error = args.find((a) => a instanceof Error);
      process.stderr.write(`${JSON.stringify({ event, error: error?.error ?? error?.name,
        error_description: error?.error_description ?? error?.message, detail: error?.error_detail })}\n`);
    });
  }
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ ready: true })}\n`);
}

function configuration(client) {
  const signing = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  // No use nor alg given: oidc-provider publishes use "sig" and no alg, as a deployment left to its defaults.
  const jwk = { ...signing.export({ format: 'jwk' }), kid: crypto.randomUUID() };
  const resource = settings.resource;
  return {
    clients: [client],
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', ...settings.scopes],
    claims: { openid: ['sub'] },
    pkce: { required: () => true, methods: ['S256'] },
    responseTypes: ['code'],
    clientAuthMethods: ['private_key_jwt'],
    enabledJWA: {
      clientAuthSigningAlgValues: ['PS256'],
      requestObjectSigningAlgValues: ['PS256'],
      idTokenSigningAlgValues: ['PS256'],
    },
    // Refresh tokens as oidc-provider issues them by default (offline_access, which OIDC Core §11 honours with
    // prompt=consent only), rotated at every use as the UAE profile's banks do (oidc-provider's default rotates
    // a sender-constrained client's only near expiry).
    rotateRefreshToken: () => true,
    findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    features: {
      fapi: { enabled: true, profile: '2.0' },
      pushedAuthorizationRequests: { enabled: true, requirePushedAuthorizationRequests: true },
      requestObjects: { request: true, requireSignedRequestObject: true },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        getCertificate: (ctx) => (ctx.req.socket.authorized ? ctx.req.socket.getPeerX509Certificate() : undefined),
      },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resource,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, indicator) => {
          if (indicator !== resource) throw new Error(`unknown resource ${indicator}`);
          return { scope: settings.scopes.join(' '), accessTokenFormat: 'opaque', accessTokenTTL: 300 };
        },
      },
      richAuthorizationRequests: {
        enabled: true,
        ack: 'experimental-01',
        types: Object.fromEntries(settings.authorization_details_types.map((type) => [type, { validate() {} }])),
        // The details the customer consented to (dev interactions consent to what was asked), each marked
        // Authorized, as a UAE bank's token answer carries its consent.
        rarForAuthorizationCode: (ctx) => (ctx.oidc.params.authorization_details === undefined ? undefined
          : JSON.parse(ctx.oidc.params.authorization_details)
            .map((detail) => ({ ...detail, consent: { ...detail.consent, Status: 'Authorized' } }))),
        rarForCodeResponse: (ctx) => ctx.oidc.authorizationCode.rar,
        rarForRefreshTokenResponse: (ctx) => ctx.oidc.refreshToken.rar,
        rarForIntrospectionResponse: (ctx, token) => token.rar,
      },
    },
  };
}
