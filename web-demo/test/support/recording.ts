/**
 * A WebSocket that records every gateway message it delivers, decoded independently of the SDK,
 * so tests can check the wire itself (exactly one terminal response per request, no chunk after
 * it) rather than trusting the SDK's own checks.
 */
import WS from "ws";
import { decode } from "@muxgate/sdk";
import type { GatewayMessage, WebSocketConstructor } from "@muxgate/sdk";

export function recordingWebSocket(log: GatewayMessage[]): WebSocketConstructor {
  return class extends WS {
    constructor(url: string, protocols?: string | string[]) {
      super(url, protocols);
      this.addEventListener("message", (ev) => {
        const data = ev.data;
        const payload = typeof data === "string" ? data : new Uint8Array(data as ArrayBuffer);
        const codec = typeof data === "string" ? "json" : "msgpack";
        for (const m of decode(payload, codec, "gateway")) if (!(m instanceof Error)) log.push(m as GatewayMessage);
      });
    }
  } as unknown as WebSocketConstructor;
}

/** Checks G1/G2 on a recorded log: per request, chunks (seq 0..n) then exactly one response,
 * then at most a usage and cancel_results; never a chunk after the response. */
export function checkWire(log: GatewayMessage[], requestIds: string[]): Map<string, GatewayMessage[]> {
  const byId = new Map<string, GatewayMessage[]>();
  for (const m of log) {
    if (!("request_id" in m) || m.request_id === undefined) continue;
    const list = byId.get(m.request_id) ?? [];
    list.push(m);
    byId.set(m.request_id, list);
  }
  for (const id of requestIds) {
    const list = byId.get(id) ?? [];
    const responses = list.filter((m) => m.type === "response");
    if (responses.length !== 1) throw new Error(`${id}: ${responses.length} responses`);
    const at = list.findIndex((m) => m.type === "response");
    const after = list.slice(at + 1).filter((m) => m.type === "chunk");
    if (after.length) throw new Error(`${id}: ${after.length} chunks after the response`);
    const seqs = list.filter((m) => m.type === "chunk").map((m) => (m as { seq: number }).seq);
    seqs.forEach((s, i) => { if (s !== i) throw new Error(`${id}: seq ${s} at ${i}`); });
  }
  return byId;
}
