/**
 * A strict msgpack reader for the wire's needs (SPEC.md §2.3, §2.4). Encoding uses
 * `@msgpack/msgpack` (its output is the canonical form of §9); decoding is our own because the
 * protocol needs what a general-purpose decoder does not give: invalid UTF-8 in a `str` refused
 * (not replaced), floats kept apart from integers (`1.0` is not an integer, §3.1), int64/uint64
 * beyond 2^53 refused rather than rounded, map keys that are neither `str` nor `bin` refused at
 * any depth, and `bin` keys kept apart instead of failing the frame (§2.3).
 */

import { BIN_KEYS, ExtValue, Float64, define } from "./wire.js";

/** A malformed object: the frame cannot be read past it (SPEC.md §2.4). */
export class MalformedMsgpack extends Error {}

const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const MAX_DEPTH = 1000; // far beyond any valid message; guards the stack

export class MsgpackReader {
  private pos = 0;
  private readonly view: DataView;
  constructor(private readonly bytes: Uint8Array) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get done(): boolean {
    return this.pos >= this.bytes.length;
  }

  private need(n: number): number {
    const at = this.pos;
    if (at + n > this.bytes.length) throw new MalformedMsgpack("truncated msgpack");
    this.pos += n;
    return at;
  }

  private str(length: number): string {
    const at = this.need(length);
    try {
      return utf8.decode(this.bytes.subarray(at, at + length));
    } catch {
      throw new MalformedMsgpack("a msgpack str that is not UTF-8");
    }
  }

  private bin(length: number): Uint8Array {
    const at = this.need(length);
    return this.bytes.slice(at, at + length);
  }

  private int(value: number | bigint): number | bigint {
    if (typeof value === "bigint") {
      return value >= BigInt(-Number.MAX_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
    }
    return value;
  }

  private float(value: number): number | Float64 {
    return Number.isInteger(value) ? new Float64(value) : value;
  }

  private array(n: number, depth: number): unknown[] {
    const out: unknown[] = [];
    for (let i = 0; i < n; i++) out.push(this.read(depth + 1));
    return out;
  }

  private map(n: number, depth: number): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    let binKeys = 0;
    for (let i = 0; i < n; i++) {
      const key = this.read(depth + 1, true);
      const value = this.read(depth + 1);
      if (typeof key === "string") define(out, key, value);
      else binKeys++; // a bin key: not a field name (SPEC.md §2.3)
    }
    if (binKeys) Object.defineProperty(out, BIN_KEYS, { value: binKeys, enumerable: false });
    return out;
  }

  /** Reads one object; throws {@link MalformedMsgpack}. */
  read(depth = 0, isKey = false): unknown {
    if (depth > MAX_DEPTH) throw new MalformedMsgpack("msgpack nests too deep");
    const v = this.view;
    const b = this.bytes[this.need(1)]!;
    let value: unknown;
    if (b <= 0x7f) value = b;
    else if (b >= 0xe0) value = b - 0x100;
    else if (b >= 0xa0 && b <= 0xbf) value = this.str(b & 0x1f);
    else if (b >= 0x90 && b <= 0x9f) value = this.array(b & 0x0f, depth);
    else if (b >= 0x80 && b <= 0x8f) value = this.map(b & 0x0f, depth);
    else {
      switch (b) {
        case 0xc0: value = null; break;
        case 0xc2: value = false; break;
        case 0xc3: value = true; break;
        case 0xc4: value = this.bin(v.getUint8(this.need(1))); break;
        case 0xc5: value = this.bin(v.getUint16(this.need(2))); break;
        case 0xc6: value = this.bin(v.getUint32(this.need(4))); break;
        case 0xc7: { const n = v.getUint8(this.need(1)); const t = v.getInt8(this.need(1)); value = new ExtValue(t, this.bin(n)); break; }
        case 0xc8: { const n = v.getUint16(this.need(2)); const t = v.getInt8(this.need(1)); value = new ExtValue(t, this.bin(n)); break; }
        case 0xc9: { const n = v.getUint32(this.need(4)); const t = v.getInt8(this.need(1)); value = new ExtValue(t, this.bin(n)); break; }
        case 0xca: value = this.float(v.getFloat32(this.need(4))); break;
        case 0xcb: value = this.float(v.getFloat64(this.need(8))); break;
        case 0xcc: value = v.getUint8(this.need(1)); break;
        case 0xcd: value = v.getUint16(this.need(2)); break;
        case 0xce: value = v.getUint32(this.need(4)); break;
        case 0xcf: value = this.int(v.getBigUint64(this.need(8))); break;
        case 0xd0: value = v.getInt8(this.need(1)); break;
        case 0xd1: value = v.getInt16(this.need(2)); break;
        case 0xd2: value = v.getInt32(this.need(4)); break;
        case 0xd3: value = this.int(v.getBigInt64(this.need(8))); break;
        case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: {
          const n = 1 << (b - 0xd4);
          const t = v.getInt8(this.need(1));
          value = new ExtValue(t, this.bin(n));
          break;
        }
        case 0xd9: value = this.str(v.getUint8(this.need(1))); break;
        case 0xda: value = this.str(v.getUint16(this.need(2))); break;
        case 0xdb: value = this.str(v.getUint32(this.need(4))); break;
        case 0xdc: value = this.array(v.getUint16(this.need(2)), depth); break;
        case 0xdd: value = this.array(v.getUint32(this.need(4)), depth); break;
        case 0xde: value = this.map(v.getUint16(this.need(2)), depth); break;
        case 0xdf: value = this.map(v.getUint32(this.need(4)), depth); break;
        default: throw new MalformedMsgpack(`invalid msgpack byte 0x${b.toString(16)}`); // 0xc1
      }
    }
    if (isKey && typeof value !== "string" && !(value instanceof Uint8Array)) {
      throw new MalformedMsgpack("a msgpack map key that is neither str nor bin");
    }
    return value;
  }
}
