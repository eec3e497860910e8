// Checking a downloaded model in the browser, as `fedctl models download` does with
// `verify_download` (controller/models/signing.py): the metadata file must carry an Ed25519
// signature, by the controller's key, over the canonical JSON of its `metadata` object, and the
// weights must have the SHA-256 and size that metadata states. The key comes from
// `/v1/models/signing-key`, never from the metadata itself.
//
// The signed bytes are Python's `json.dumps(metadata, sort_keys=True, separators=(",", ":"),
// ensure_ascii=False)`. JavaScript cannot rebuild them from `JSON.parse`: Python writes `1.0`
// and `1e-05` where JavaScript writes `1` and `0.00001`. But the metadata file was written by
// the same `json.dumps`, so each number's text in the file is already Python's: the parser below
// keeps that text, and the canonical form is rebuilt from it. Strings are escaped alike by both
// (`"`, `\`, \b \f \n \r \t, other control characters as lowercase \u00xx, the rest as is).

export const METADATA_FORMAT = 'fedsky-model-metadata/1';

export class VerificationError extends Error {
  constructor(message) {
    super(message);
    this.name = 'VerificationError';
  }
}

/** A JSON number as the file wrote it. */
class RawNumber {
  constructor(text) {
    this.text = text;
  }

  valueOf() {
    return Number(this.text);
  }
}

const NUMBER = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;

/** Parse JSON text, numbers kept as their text (RawNumber); a repeated key is an error, as in
 * `verify_download` (a person could be shown one value while the signature covers another). */
export function parseKeepingNumbers(text) {
  let i = 0;
  const fail = (what) => {
    throw new SyntaxError(`${what} at character ${i}`);
  };
  const space = () => {
    while (i < text.length && (text[i] === ' ' || text[i] === '\t' || text[i] === '\n' || text[i] === '\r')) i += 1;
  };
  const literal = (word, value) => {
    if (text.startsWith(word, i)) {
      i += word.length;
      return { value };
    }
    return null;
  };

  function string() {
    const start = i;
    i += 1;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        i += 1;
        return JSON.parse(text.slice(start, i)); // decodes (and checks) the escapes
      }
      i += c === '\\' ? 2 : 1;
    }
    return fail('unterminated string');
  }

  function object() {
    i += 1;
    const out = Object.create(null);
    space();
    if (text[i] === '}') {
      i += 1;
      return out;
    }
    for (;;) {
      space();
      if (text[i] !== '"') fail('expected a key');
      const key = string();
      if (Object.prototype.hasOwnProperty.call(out, key)) {
        throw new VerificationError(`metadata repeats the key ${JSON.stringify(key)}`);
      }
      space();
      if (text[i] !== ':') fail("expected ':'");
      i += 1;
      out[key] = value();
      space();
      if (text[i] === ',') {
        i += 1;
      } else if (text[i] === '}') {
        i += 1;
        return out;
      } else fail("expected ',' or '}'");
    }
  }

  function array() {
    i += 1;
    const out = [];
    space();
    if (text[i] === ']') {
      i += 1;
      return out;
    }
    for (;;) {
      out.push(value());
      space();
      if (text[i] === ',') {
        i += 1;
      } else if (text[i] === ']') {
        i += 1;
        return out;
      } else fail("expected ',' or ']'");
    }
  }

  function value() {
    space();
    const c = text[i];
    if (c === '{') return object();
    if (c === '[') return array();
    if (c === '"') return string();
    const word = literal('true', true) || literal('false', false) || literal('null', null);
    if (word) return word.value;
    NUMBER.lastIndex = i;
    const m = NUMBER.exec(text);
    if (m) {
      i += m[0].length;
      return new RawNumber(m[0]);
    }
    return fail('unexpected input');
  }

  const result = value();
  space();
  if (i !== text.length) fail('unexpected data after the JSON value');
  return result;
}

/** Python's order of `sort_keys`: by code point (JavaScript's default sort is by UTF-16 unit,
 * which differs past U+FFFF). */
function byCodePoint(a, b) {
  const A = Array.from(a);
  const B = Array.from(b);
  for (let k = 0; k < Math.min(A.length, B.length); k += 1) {
    const d = A[k].codePointAt(0) - B[k].codePointAt(0);
    if (d) return d;
  }
  return A.length - B.length;
}

/** The canonical JSON text of a value from `parseKeepingNumbers` (signing.canonical_json). */
export function canonicalJson(value) {
  if (value === null) return 'null';
  if (value === true) return 'true';
  if (value === false) return 'false';
  if (value instanceof RawNumber) return value.text;
  if (typeof value === 'string') return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  const keys = Object.keys(value).sort(byCodePoint);
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`).join(',')}}`;
}

function base64Bytes(text, what) {
  // Strict, as Python's b64decode(validate=True): only the alphabet and padding.
  if (typeof text !== 'string' || text.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) {
    throw new VerificationError(`${what} is not base64`);
  }
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let k = 0; k < raw.length; k += 1) out[k] = raw.charCodeAt(k);
  return out;
}

function pemBody(pem) {
  const b64 = String(pem)
    .replace(/-----BEGIN PUBLIC KEY-----/, '')
    .replace(/-----END PUBLIC KEY-----/, '')
    .replace(/\s+/g, '');
  return base64Bytes(b64, "the controller's signing key");
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, '0')).join('');
}

export async function sha256Hex(data) {
  return hex(await crypto.subtle.digest('SHA-256', data));
}

async function importKey(pem) {
  if (!window.crypto || !crypto.subtle) {
    throw new VerificationError('this page has no WebCrypto (it needs HTTPS)');
  }
  try {
    return await crypto.subtle.importKey('spki', pemBody(pem), { name: 'Ed25519' }, false, ['verify']);
  } catch (err) {
    if (err instanceof VerificationError) throw err;
    if (err && err.name === 'NotSupportedError') {
      throw new VerificationError(
        'this browser cannot check Ed25519 signatures (WebCrypto without Ed25519); ' +
          'use `fedctl models verify FILE` instead',
      );
    }
    throw new VerificationError(`cannot read the controller's signing key: ${err && err.message}`);
  }
}

/**
 * Verify a download. `weights`, `metadataBytes`: ArrayBuffers as fetched; `signingKey`: the
 * answer of `/v1/models/signing-key` ({public_key_pem, key_id}). Returns
 * `{metadata, sha256, size, keyId}`; throws VerificationError saying what failed.
 */
export async function verifyDownload({ weights, metadataBytes, signingKey }) {
  let doc;
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(metadataBytes);
    doc = parseKeepingNumbers(text);
  } catch (err) {
    if (err instanceof VerificationError) throw err;
    throw new VerificationError('the metadata is not valid JSON: it was damaged or altered');
  }
  const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof RawNumber);
  if (!isObject(doc) || doc.format !== METADATA_FORMAT) {
    throw new VerificationError(`the metadata is not fedsky model metadata (${METADATA_FORMAT})`);
  }
  const { metadata, signature } = doc;
  if (!isObject(metadata) || !isObject(signature)) {
    throw new VerificationError('the metadata lacks its metadata or signature');
  }
  if (signature.algorithm !== 'ed25519' || typeof signature.value !== 'string') {
    throw new VerificationError('the metadata carries no Ed25519 signature');
  }
  const trustedId = signingKey.key_id;
  const key = await importKey(signingKey.public_key_pem);
  let good = false;
  try {
    const sig = base64Bytes(signature.value, 'the signature');
    const signed = new TextEncoder().encode(canonicalJson(metadata));
    good = await crypto.subtle.verify({ name: 'Ed25519' }, key, sig, signed);
  } catch (err) {
    if (!(err instanceof VerificationError)) throw new VerificationError(`cannot check the signature: ${err && err.message}`);
    good = false;
  }
  if (!good) {
    if (signature.key_id !== trustedId) {
      throw new VerificationError(
        `the metadata was not signed by this controller: it names key ${JSON.stringify(signature.key_id ?? null)}, ` +
          `the trusted key is ${trustedId}`,
      );
    }
    throw new VerificationError(
      `the metadata was altered after signing: its signature does not match its content (key ${trustedId})`,
    );
  }
  const described = metadata.weights;
  if (!isObject(described) || typeof described.sha256 !== 'string') {
    throw new VerificationError('the metadata does not describe the weights');
  }
  const sha = await sha256Hex(weights);
  const size = weights.byteLength;
  const signedSize = described.size instanceof RawNumber ? Number(described.size.text) : null;
  if (size !== signedSize || sha !== described.sha256) {
    throw new VerificationError(
      `the weights do not match the signed metadata: SHA-256 ${sha.slice(0, 16)}… (${size} bytes), ` +
        `signed ${described.sha256.slice(0, 16)}… (${signedSize ?? '?'} bytes); the file was damaged or replaced`,
    );
  }
  return { metadata, sha256: sha, size, keyId: trustedId };
}

/** A plain value from a `parseKeepingNumbers` tree (for showing round, job). */
export function plain(value) {
  if (value instanceof RawNumber) return Number(value.text);
  return value;
}
