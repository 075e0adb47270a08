/** The claims of a JWT, decoded without verifying (the gateway verifies; the client only reads `exp` and `sub`). */
export function decodeClaims(token: string): { exp?: number; sub?: string; [k: string]: unknown } {
  const part = token.split(".")[1];
  if (!part) return {};
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const bin = atob(padded);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const claims: unknown = JSON.parse(new TextDecoder().decode(bytes));
    return typeof claims === "object" && claims !== null ? (claims as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}

/** `exp` of the token in ms since the epoch, or undefined. */
export function expiresAt(token: string): number | undefined {
  const exp = decodeClaims(token).exp;
  return typeof exp === "number" ? exp * 1000 : undefined;
}
