/** Full-jitter exponential backoff: a delay drawn uniformly from [0, min(maxMs, baseMs × 2^attempt)). */
export function fullJitter(attempt: number, baseMs: number, maxMs: number, random: () => number = Math.random): number {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}
