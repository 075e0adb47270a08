// The submit path ferry's gateway is measured against in `loadtest submit`: what a team would otherwise build
// with the anchors — one Node process running Fastify, verifying an HS256 bearer token (@fastify/jwt) and its
// scope, checking the body against a JSON schema, and adding the job with BullMQ's `queue.add` (defaults).
// It answers like ferry: 202 with {id, queue, state}, 401 without a valid token, 403 without the scope, 400 on
// a bad body.
//
// Usage: node server.mjs PORT REDIS_URL   (the secret comes from LOADTEST_JWT_SECRET)
// GET /healthz answers 200 once the queue's connection is ready.

import Fastify from 'fastify';
import fastifyJwt from '@fastify/jwt';
import { Queue } from 'bullmq';
import IORedis from 'ioredis';

const [port, redisUrl] = process.argv.slice(2);
const secret = process.env.LOADTEST_JWT_SECRET;
if (!port || !redisUrl || !secret) {
  console.error('usage: LOADTEST_JWT_SECRET=… node server.mjs PORT REDIS_URL');
  process.exit(64);
}

const connection = new IORedis(redisUrl, { maxRetriesPerRequest: null });
const queues = new Map();
function queueOf(name) {
  let q = queues.get(name);
  if (!q) {
    q = new Queue(name, { connection });
    queues.set(name, q);
  }
  return q;
}

const app = Fastify({ logger: false });
await app.register(fastifyJwt, { secret, verify: { algorithms: ['HS256'] } });

app.get('/healthz', async () => ({ ok: true }));

const jobSchema = {
  body: {
    type: 'object',
    required: ['kind'],
    additionalProperties: false,
    properties: {
      kind: { type: 'string', minLength: 1, maxLength: 128 },
      payload: {},
      priority: { type: 'string', enum: ['high', 'normal', 'low'] },
      delay_ms: { type: 'integer', minimum: 0 },
      max_attempts: { type: 'integer', minimum: 1, maximum: 100 },
    },
  },
  params: {
    type: 'object',
    properties: { queue: { type: 'string', pattern: '^[A-Za-z0-9_.-]{1,128}$' } },
  },
};

app.post('/v1/queues/:queue/jobs', { schema: jobSchema }, async (req, reply) => {
  let claims;
  try {
    claims = await req.jwtVerify();
  } catch {
    return reply.code(401).send({ title: 'unauthorized' });
  }
  const scopes = typeof claims.scope === 'string' ? claims.scope.split(' ') : [];
  if (!scopes.includes('jobs:submit')) {
    return reply.code(403).send({ title: 'forbidden' });
  }
  const { kind, payload = null, delay_ms: delay, max_attempts: attempts } = req.body;
  const job = await queueOf(req.params.queue).add(kind, payload, {
    ...(delay ? { delay } : {}),
    ...(attempts ? { attempts } : {}),
  });
  return reply
    .code(202)
    .send({ id: job.id, queue: req.params.queue, state: delay ? 'scheduled' : 'queued' });
});

await connection.ping();
await app.listen({ port: Number(port), host: '127.0.0.1' });
