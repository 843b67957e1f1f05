// An independent follower of a filial model line, in Node.js: for every version in the line's event
// stream it fetches manifest and weights and checks them the way README "Signed manifests" says:
//   sha256(weights) == manifest.weights_sha256, length == manifest.weights_bytes, and, with a key,
//   signature == hex HMAC-SHA256(key, RFC 8785 JSON of the manifest without "signature")
//   (manifests without "signature_scheme" predate it and are not checked here).
// Usage: node follower.mjs REDIS_URL PREFIX LINE [HMAC_KEY]; prints one JSON line per version.
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import canonicalize from "canonicalize";
import Redis from "ioredis";

const [url, prefix, line, key] = process.argv.slice(2);
const redis = new Redis(url);
try {
  const entries = await redis.xrange(`${prefix}:line:${line}:events`, "-", "+");
  for (const [, fields] of entries) {
    const event = JSON.parse(fields[fields.indexOf("event") + 1]);
    const raw = await redis.get(event.manifest_key);
    const weights = await redis.getBuffer(event.weights_key);
    const manifest = JSON.parse(raw);
    const sha256 = createHash("sha256").update(weights).digest("hex");
    const result = {
      version: event.version, reason: manifest.reason, scheme: manifest.signature_scheme ?? null,
      sha256_ok: sha256 === manifest.weights_sha256 && weights.length === manifest.weights_bytes,
      hmac_ok: null,
    };
    if (key !== undefined) {
      if (manifest.signature_scheme !== "hmac-sha256-jcs" || typeof manifest.signature !== "string") {
        result.hmac_ok = false;
      } else {
        const { signature, ...signed } = manifest;
        const expected = createHmac("sha256", key).update(canonicalize(signed), "utf8").digest();
        const given = Buffer.from(signature, "hex");
        result.hmac_ok = given.length === expected.length && timingSafeEqual(given, expected);
      }
    }
    console.log(JSON.stringify(result));
  }
} finally {
  redis.disconnect();
}
