// BullMQ side of ferry's `loadtest jobs` benchmark.
//
// Runs the same three phases as the Rust side, against a redis-server the Rust runner started (same binary,
// same version, persistence off), and prints ONE JSON document on stdout (everything else goes to stderr):
//
//   1. enqueue:    N no-op jobs with `queue.addBulk` in chunks of 1000, several chunks in flight → jobs/s.
//   2. processing: ONE worker process (this file with `--role worker`, a separate node process like
//                  `ferry worker`) with the given concurrency; time from its spawn until the queue holds no
//                  waiting/active job → jobs/s. Redis CPU (from /proc, and INFO commandstats) over the phase.
//   3. latency:    at each fixed offered rate, a paced producer adds small batches every ~1 ms; a QueueEvents
//                  listener in this (producer) process matches each 'completed' event to the job's send time.
//
// Every loop is bounded in count and time; the worker process exits by itself when its parent goes away.
//
// Usage: node bench.mjs --redis redis://127.0.0.1:PORT --redis-pid PID [--jobs 200000] [--concurrency 50]
//                       [--rates 2000,5000] [--latency-secs 10] [--remove-on-complete] [--queue NAME]

import { spawn, execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { createRequire } from 'node:module';
import os from 'node:os';

import { Queue, QueueEvents, Worker } from 'bullmq';
import IORedis from 'ioredis';

const require = createRequire(import.meta.url);

// ---------------------------------------------------------------------------------------------------------
// arguments

function parseArgs(argv) {
  const a = {
    role: 'producer',
    redis: null,
    redisPid: null,
    jobs: 200000,
    concurrency: 50,
    rates: [2000, 5000],
    latencySecs: 10,
    removeOnComplete: false,
    queue: 'bench',
    chunk: 1000,
    enqueueTasks: 4,
    maxSecs: 900,
  };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${k} needs a value`);
      return argv[++i];
    };
    switch (k) {
      case '--role': a.role = v(); break;
      case '--redis': a.redis = v(); break;
      case '--redis-pid': a.redisPid = Number(v()); break;
      case '--jobs': a.jobs = Number(v()); break;
      case '--concurrency': a.concurrency = Number(v()); break;
      case '--rates': a.rates = v().split(',').filter(Boolean).map(Number); break;
      case '--latency-secs': a.latencySecs = Number(v()); break;
      case '--remove-on-complete': a.removeOnComplete = true; break;
      case '--queue': a.queue = v(); break;
      case '--chunk': a.chunk = Number(v()); break;
      case '--enqueue-tasks': a.enqueueTasks = Number(v()); break;
      case '--max-secs': a.maxSecs = Number(v()); break;
      default: throw new Error(`unknown argument ${k}`);
    }
  }
  if (!a.redis) throw new Error('--redis URL is required');
  for (const [k, x] of Object.entries({ jobs: a.jobs, concurrency: a.concurrency, chunk: a.chunk })) {
    if (!Number.isInteger(x) || x <= 0) throw new Error(`--${k} must be a positive integer`);
  }
  return a;
}

function connectionOf(url) {
  const u = new URL(url);
  return {
    host: u.hostname,
    port: Number(u.port || 6379),
    db: u.pathname.length > 1 ? Number(u.pathname.slice(1)) : 0,
    // The worker's blocking connection needs this; harmless elsewhere.
    maxRetriesPerRequest: null,
  };
}

const log = (...m) => process.stderr.write(`[bullmq-bench] ${m.join(' ')}\n`);

// ---------------------------------------------------------------------------------------------------------
// CPU accounting from /proc (same method as the Rust side's `redis_cpu::proc_cpu_micros`)

let clkTck = null;
function clockTicks() {
  if (clkTck === null) {
    clkTck = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
  }
  return clkTck;
}

/** utime + stime of a process in microseconds. */
function procCpuMicros(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The command name (field 2) is in parentheses and may contain spaces: count fields after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state); utime is field 14, stime field 15.
  const ticks = Number(rest[11]) + Number(rest[12]);
  return Math.round((ticks * 1e6) / clockTicks());
}

/** Machine-wide [busy, steal] CPU ticks from /proc/stat (same as the Rust side's `system_cpu_ticks`). */
function systemCpuTicks() {
  const line = readFileSync('/proc/stat', 'utf8').split('\n').find((l) => l.startsWith('cpu '));
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const g = (i) => v[i] || 0;
  return [g(0) + g(1) + g(2) + g(5) + g(6) + g(7), g(7)];
}

/** INFO commandstats as { cmd: { calls, usec } }. */
async function commandstats(admin) {
  const text = await admin.info('commandstats');
  const out = {};
  for (const line of text.split('\n')) {
    const m = /^cmdstat_([^:]+):calls=(\d+),usec=(\d+)/.exec(line.trim());
    if (m) out[m[1]] = { calls: Number(m[2]), usec: Number(m[3]) };
  }
  return out;
}

async function infoField(admin, section, field) {
  const text = await admin.info(section);
  const m = new RegExp(`^${field}:(.*)$`, 'm').exec(text);
  return m ? m[1].trim() : null;
}

const SCRIPT_CMDS = new Set(['eval', 'evalsha', 'eval_ro', 'evalsha_ro', 'fcall', 'fcall_ro']);

/** Start measuring Redis (and optionally another process) over a phase. */
async function startMeter(admin, redisPid, otherPid) {
  await admin.config('RESETSTAT');
  return {
    t: process.hrtime.bigint(),
    redisCpu: redisPid ? procCpuMicros(redisPid) : null,
    otherCpu: otherPid ? procCpuMicros(otherPid) : null,
    system: systemCpuTicks(),
  };
}

async function stopMeter(admin, m, redisPid, otherPid, jobs) {
  const secs = Number(process.hrtime.bigint() - m.t) / 1e9;
  const stats = await commandstats(admin);
  // The meter's own commands are not part of the workload.
  delete stats['config|resetstat'];
  delete stats.info;
  let usecAll = 0;
  let usecScripts = 0;
  let calls = 0;
  const perCommand = {};
  for (const [cmd, s] of Object.entries(stats)) {
    usecAll += s.usec;
    calls += s.calls;
    if (SCRIPT_CMDS.has(cmd)) usecScripts += s.usec;
    perCommand[cmd] = { calls: s.calls, usec: s.usec, usec_per_job: round(s.usec / jobs, 3) };
  }
  const redisCpu = redisPid ? procCpuMicros(redisPid) - m.redisCpu : null;
  const otherCpu = otherPid ? procCpuMicros(otherPid) - m.otherCpu : null;
  const [busy, steal] = systemCpuTicks();
  const cores = (ticks) => round(ticks / clockTicks() / secs, 2);
  return {
    secs: round(secs, 4),
    redis_cpu_usec: redisCpu,
    redis_cpu_usec_per_job: redisCpu === null ? null : round(redisCpu / jobs, 3),
    redis_cpu_utilisation: redisCpu === null ? null : round(redisCpu / 1e6 / secs, 3),
    commandstats_usec_per_job: round(usecAll / jobs, 3),
    commandstats_script_usec_per_job: round(usecScripts / jobs, 3),
    commandstats_calls_per_job: round(calls / jobs, 3),
    commandstats: perCommand,
    other_cpu_usec: otherCpu,
    system_busy_cores: cores(busy - m.system[0]),
    system_steal_cores: cores(steal - m.system[1]),
  };
}

function round(x, d) {
  const f = 10 ** d;
  return Math.round(x * f) / f;
}

function percentiles(samplesMs) {
  const v = Float64Array.from(samplesMs).sort();
  const n = v.length;
  // Nearest rank, the same definition as the Rust side.
  const at = (p) => (n === 0 ? null : round(v[Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1))], 3));
  return {
    samples: n,
    p50_ms: at(50),
    p90_ms: at(90),
    p99_ms: at(99),
    p999_ms: at(99.9),
    max_ms: n === 0 ? null : round(v[n - 1], 3),
    mean_ms: n === 0 ? null : round(v.reduce((s, x) => s + x, 0) / n, 3),
  };
}

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

// ---------------------------------------------------------------------------------------------------------
// worker role: a separate process, like `ferry worker`

async function runWorker(a) {
  const worker = new Worker(a.queue, async () => null, {
    connection: connectionOf(a.redis),
    concurrency: a.concurrency,
  });
  worker.on('error', (e) => log('worker error:', e?.message ?? e));
  let closing = false;
  const stop = async (why) => {
    if (closing) return;
    closing = true;
    log(`worker stopping (${why})`);
    const force = setTimeout(() => process.exit(0), 10000);
    force.unref();
    try {
      await worker.close();
    } finally {
      process.exit(0);
    }
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  // The parent holds our stdin: when it goes away, so do we.
  process.stdin.on('end', () => stop('parent gone'));
  process.stdin.resume();
  setTimeout(() => stop('max lifetime'), a.maxSecs * 1000).unref();
  await worker.waitUntilReady();
  process.stdout.write('ready\n');
}

// ---------------------------------------------------------------------------------------------------------
// producer role: the phases

async function enqueuePhase(a, queue, admin) {
  const m = await startMeter(admin, a.redisPid, null);
  const chunks = Math.ceil(a.jobs / a.chunk);
  let next = 0;
  const task = async () => {
    for (;;) {
      const c = next++;
      if (c >= chunks) return;
      const n = Math.min(a.chunk, a.jobs - c * a.chunk);
      const batch = new Array(n);
      for (let i = 0; i < n; i++) batch[i] = { name: 'noop', data: {} };
      await queue.addBulk(batch);
    }
  };
  await Promise.all(Array.from({ length: a.enqueueTasks }, task));
  const r = await stopMeter(admin, m, a.redisPid, null, a.jobs);
  delete r.other_cpu_usec;
  return { jobs: a.jobs, chunk: a.chunk, tasks: a.enqueueTasks, jobs_per_sec: round(a.jobs / r.secs, 1), redis: r };
}

function spawnWorker(a) {
  const args = [
    fileURLToPath(import.meta.url),
    '--role', 'worker',
    '--redis', a.redis,
    '--queue', a.queue,
    '--concurrency', String(a.concurrency),
    '--max-secs', String(a.maxSecs),
  ];
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'inherit'] });
  const ready = new Promise((resolve, reject) => {
    let buf = '';
    child.stdout.on('data', (d) => {
      buf += d.toString();
      if (buf.includes('ready')) resolve(nowMs());
    });
    child.on('exit', (code) => reject(new Error(`worker exited early with ${code}`)));
  });
  ready.catch(() => {});
  return { child, ready };
}

async function stopWorker(w) {
  if (w.child.exitCode !== null) return;
  const exited = new Promise((r) => w.child.once('exit', r));
  w.child.kill('SIGTERM');
  const t = setTimeout(() => w.child.kill('SIGKILL'), 15000);
  await exited;
  clearTimeout(t);
}

async function waitingAndActive(queue) {
  const c = await queue.getJobCounts('wait', 'active', 'prioritized', 'delayed', 'paused');
  return Object.values(c).reduce((s, x) => s + x, 0);
}

async function processingPhase(a, queue, admin) {
  const startCpu = procCpuMicros(process.pid);
  const m = await startMeter(admin, a.redisPid, null);
  const t0 = nowMs();
  const w = spawnWorker(a);
  const meterWorker = { ...m, otherCpu: 0 };
  let firstProgress = null;
  let readyAt = null;
  w.ready.then((t) => { readyAt = t; }, () => {});
  const deadline = t0 + a.maxSecs * 1000;
  let left = a.jobs;
  // Poll every 10 ms (a few cheap LLEN/ZCARD calls: negligible next to the workload).
  while (nowMs() < deadline) {
    left = await waitingAndActive(queue);
    if (firstProgress === null && left < a.jobs) firstProgress = nowMs();
    if (left === 0) break;
    if (w.child.exitCode !== null) throw new Error(`worker exited with ${w.child.exitCode}`);
    await sleep(10);
  }
  const t1 = nowMs();
  if (left !== 0) throw new Error(`processing timed out with ${left} jobs left`);
  const r = await stopMeter(admin, meterWorker, a.redisPid, w.child.pid, a.jobs);
  const counts = await queue.getJobCounts('completed', 'failed');
  const usedMemory = Number(await infoField(admin, 'memory', 'used_memory'));
  const secs = (t1 - t0) / 1000;
  return {
    worker: w,
    result: {
      jobs: a.jobs,
      concurrency: a.concurrency,
      secs: round(secs, 4),
      jobs_per_sec: round(a.jobs / secs, 1),
      worker_ready_ms: readyAt === null ? null : round(readyAt - t0, 1),
      first_completion_ms: firstProgress === null ? null : round(firstProgress - t0, 1),
      steady_jobs_per_sec: firstProgress === null ? null : round(a.jobs / ((t1 - firstProgress) / 1000), 1),
      worker_cpu_usec_per_job: round(r.other_cpu_usec / a.jobs, 3),
      worker_cpu_utilisation: round(r.other_cpu_usec / 1e6 / secs, 3),
      producer_poll_cpu_usec: procCpuMicros(process.pid) - startCpu,
      completed_kept: counts.completed,
      failed: counts.failed,
      redis_used_memory_bytes: usedMemory,
      redis_used_memory_bytes_per_job: round(usedMemory / a.jobs, 1),
      redis: (({ other_cpu_usec, ...rest }) => rest)(r),
    },
  };
}

async function latencyPhase(a, queue, admin, events, rate, workerPid) {
  const sent = new Map(); // job id → send time (ms)
  const early = new Map(); // completions seen before addBulk returned the id
  const lat = [];
  const durMs = a.latencySecs * 1000;
  const warmupMs = Math.min(1000, durMs / 10);
  let done = 0;
  let t0 = 0;
  const record = (sentAt, doneAt) => {
    if (sentAt - t0 >= warmupMs) lat.push(doneAt - sentAt);
    done++;
  };
  const onCompleted = ({ jobId }) => {
    const t = nowMs();
    const s = sent.get(jobId);
    if (s === undefined) early.set(jobId, t);
    else {
      sent.delete(jobId);
      record(s, t);
    }
  };
  events.on('completed', onCompleted);
  const m = await startMeter(admin, a.redisPid, workerPid);
  const producerCpu0 = procCpuMicros(process.pid);
  t0 = nowMs();
  let issued = 0;
  let inFlight = 0;
  let maxInFlight = 0;
  let ticks = 0;
  const target = Math.round((rate * durMs) / 1000);
  const pending = new Set();
  while (issued < target) {
    const now = nowMs();
    if (now - t0 > durMs + 5000) break; // far behind: stop offering, report what was sent
    const due = Math.min(target, Math.floor(((now - t0) * rate) / 1000)) - issued;
    if (due > 0 && inFlight < 256) {
      const n = Math.min(due, 1000);
      issued += n;
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      const batch = new Array(n);
      for (let i = 0; i < n; i++) batch[i] = { name: 'noop', data: {} };
      const sentAt = nowMs();
      const p = queue.addBulk(batch).then((jobs) => {
        for (const j of jobs) {
          const e = early.get(j.id);
          if (e !== undefined) {
            early.delete(j.id);
            record(sentAt, e);
          } else sent.set(j.id, sentAt);
        }
      }).finally(() => {
        inFlight--;
        pending.delete(p);
      });
      pending.add(p);
    }
    ticks++;
    await sleep(1);
  }
  const sendSecs = (nowMs() - t0) / 1000;
  await Promise.all(pending);
  const drainDeadline = nowMs() + 15000;
  while (done < issued && nowMs() < drainDeadline) await sleep(5);
  const r = await stopMeter(admin, m, a.redisPid, workerPid, Math.max(1, done));
  const producerCpu = procCpuMicros(process.pid) - producerCpu0;
  events.off('completed', onCompleted);
  return {
    offered_rate: rate,
    achieved_send_rate: round(issued / sendSecs, 1),
    secs: a.latencySecs,
    warmup_ms_excluded: warmupMs,
    sent: issued,
    completed: done,
    missing: issued - done,
    ticks,
    max_batches_in_flight: maxInFlight,
    latency: percentiles(lat),
    worker_cpu_usec_per_job: round(r.other_cpu_usec / Math.max(1, done), 3),
    worker_cpu_utilisation: round(r.other_cpu_usec / 1e6 / r.secs, 3),
    producer_cpu_utilisation: round(producerCpu / 1e6 / r.secs, 3),
    redis: (({ other_cpu_usec, ...rest }) => rest)(r),
  };
}

async function runProducer(a) {
  const connection = connectionOf(a.redis);
  const admin = new IORedis({ ...connection, maxRetriesPerRequest: 3 });
  const version = await infoField(admin, 'server', 'redis_version');
  const queue = new Queue(a.queue, {
    connection,
    defaultJobOptions: a.removeOnComplete ? { removeOnComplete: true } : {},
  });
  await queue.waitUntilReady();
  await queue.obliterate({ force: true }).catch(() => {});
  const watchdog = setTimeout(() => {
    log(`giving up after ${a.maxSecs}s`);
    process.exit(3);
  }, a.maxSecs * 1000);
  watchdog.unref();

  log(`enqueue ${a.jobs} jobs`);
  const enqueue = await enqueuePhase(a, queue, admin);
  log(`enqueue: ${enqueue.jobs_per_sec} jobs/s`);
  log(`processing with one worker process, concurrency ${a.concurrency}`);
  const { worker, result: processing } = await processingPhase(a, queue, admin);
  log(`processing: ${processing.jobs_per_sec} jobs/s, Redis ${processing.redis.redis_cpu_usec_per_job} us/job`);

  const latency = [];
  if (a.rates.length > 0 && a.latencySecs > 0) {
    const events = new QueueEvents(a.queue, { connection });
    await events.waitUntilReady();
    // Let the listener's first blocking read reach Redis before the first job goes out.
    await sleep(200);
    for (const rate of a.rates) {
      log(`latency at ${rate} jobs/s for ${a.latencySecs}s`);
      const l = await latencyPhase(a, queue, admin, events, rate, worker.child.pid);
      log(`latency at ${rate}: p50 ${l.latency.p50_ms} ms, p99 ${l.latency.p99_ms} ms, missing ${l.missing}`);
      latency.push(l);
    }
    await events.close();
  }
  await stopWorker(worker);
  await queue.close();
  admin.disconnect();

  const doc = {
    system: 'bullmq',
    variant: a.removeOnComplete ? 'removeOnComplete: true' : 'default (completed jobs kept)',
    versions: {
      bullmq: require('bullmq/package.json').version,
      ioredis: require('ioredis/package.json').version,
      node: process.version,
      redis: version,
    },
    params: {
      jobs: a.jobs,
      concurrency: a.concurrency,
      rates: a.rates,
      latency_secs: a.latencySecs,
      remove_on_complete: a.removeOnComplete,
      enqueue_chunk: a.chunk,
      enqueue_tasks: a.enqueueTasks,
      nproc: os.cpus().length,
    },
    enqueue,
    processing,
    latency,
  };
  process.stdout.write(`${JSON.stringify(doc)}\n`);
}

const args = parseArgs(process.argv);
const main = args.role === 'worker' ? runWorker : runProducer;
main(args).then(
  () => { if (args.role !== 'worker') process.exit(0); },
  (e) => {
    log('failed:', e?.stack ?? e);
    process.exit(1);
  },
);
