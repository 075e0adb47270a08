// The Node `ws` peer of `loadtest ws`: the typical Node broadcast server.
//
// * WebSocket at ws://127.0.0.1:PORT/v1/ws. A client frame {"id":1,"op":"subscribe","channel":"app:bench"} adds
//   the socket to the channel's Set and is answered {"id":1,"ok":true,"channel":"app:bench"}, like ferry.
// * HTTP POST /v1/channels/<name>/publish (or POST /publish, channel app:bench) with a JSON body: the frame
//   {"channel":"app:<name>","event":"message","data":<body>,"offset":"<ms>-<n>","epoch":"<uuid>"} is serialised
//   once and sent to every subscriber with ws.send() — the same frame ferry's gateway pushes, position included
//   (kept in memory only: this server recovers nothing), so a client parses as many bytes from both. Answers 202.
// * GET /healthz → 200 ok.
//
// No authentication (ferry verifies a JWT on every upgrade; this server does not): that favours Node.
// Listens on 127.0.0.1 only. Usage: node server.mjs PORT [--answer-first]
//
// By default the 202 goes out after the last ws.send(), as a plain broadcast server does. With --answer-first it
// goes out first and the sends follow on the next turn of the event loop, as ferry's gateway through Redis does
// (its hub fans out what comes back from Redis; `ferry dev` answers after its local hand-off): with a one-process
// client, which also reads the publisher's responses, the order alone moves every delivery (loadtest/README.md,
// fan-out latency).
import http from 'node:http';
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2] ?? 0);
const answerFirst = process.argv.includes('--answer-first');
const channels = new Map(); // channel -> Set<WebSocket>
// A frame's position, shaped like ferry's (a stream id and a UUIDv7 epoch).
const epoch = '0193a8f2-7c41-7d3e-9b5a-2f4c6e8a1b3d';
let seq = 0;

function publish(channel, body, res) {
  let data;
  try {
    data = JSON.parse(body);
  } catch {
    res.writeHead(400).end('bad json');
    return;
  }
  const offset = `${Date.now()}-${seq++}`;
  const frame = JSON.stringify({ channel, event: 'message', data, offset, epoch });
  const send = () => {
    for (const ws of channels.get(channel) ?? []) {
      if (ws.readyState === ws.OPEN) ws.send(frame);
    }
  };
  if (answerFirst) {
    res.writeHead(202).end();
    setImmediate(send);
  } else {
    send();
    res.writeHead(202).end();
  }
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' }).end('ok');
    return;
  }
  const m = req.method === 'POST' && /^\/v1\/channels\/([A-Za-z0-9._:-]{1,128})\/publish$/.exec(req.url);
  if (m || (req.method === 'POST' && req.url === '/publish')) {
    const channel = m ? `app:${m[1]}` : 'app:bench';
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => publish(channel, Buffer.concat(chunks).toString('utf8'), res));
    return;
  }
  res.writeHead(404).end();
});

const wss = new WebSocketServer({ server, path: '/v1/ws', perMessageDeflate: false });
wss.on('connection', (ws) => {
  const mine = new Set();
  ws.on('message', (raw) => {
    let msg;
    try {
      msg = JSON.parse(raw.toString());
    } catch {
      ws.close(1008, 'bad json');
      return;
    }
    const id = msg.id ?? null;
    if (msg.op === 'subscribe' && typeof msg.channel === 'string') {
      let set = channels.get(msg.channel);
      if (!set) channels.set(msg.channel, (set = new Set()));
      set.add(ws);
      mine.add(msg.channel);
      ws.send(JSON.stringify({ id, ok: true, channel: msg.channel }));
    } else if (msg.op === 'ping') {
      ws.send(JSON.stringify({ id, ok: true, pong: true }));
    } else {
      ws.send(JSON.stringify({ id, ok: false, error: { code: 'bad_request' } }));
    }
  });
  ws.on('close', () => {
    for (const c of mine) channels.get(c)?.delete(ws);
  });
  ws.on('error', () => {});
});

server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
