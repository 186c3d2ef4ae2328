/**
 * An in-process stand-in for a gateway, for unit tests of the SDK's client side: a
 * WebSocket-like class (JSON codec) that answers `hello` with `welcome` and hands every other
 * client message to the test, which scripts the gateway's messages with `send`. Lets a test
 * produce what a real gateway never would (protocol violations) and order messages exactly.
 * `refuse` makes connection attempts fail (as an unreachable gateway: error, then close 1006);
 * `attempts` records when each attempt was made (for backoff tests under fake timers).
 */
import type { WebSocketConstructor, WebSocketLike } from "@muxgate/sdk";

type Wire = Record<string, unknown>;

export class FakeGateway {
  /** Every client message received, decoded, in order. */
  readonly received: Wire[] = [];
  private readonly receivedBy: FakeSocket[] = [];
  readonly sockets: FakeSocket[] = [];
  /** `Date.now()` at each connection attempt, refused ones included. */
  readonly attempts: number[] = [];
  /** While true, connection attempts fail without opening. */
  refuse = false;
  /** Called for each client message other than `hello`. */
  onMessage: (message: Wire, gateway: FakeGateway) => void = () => {};
  private waiters: { check: (m: Wire) => boolean; resolve: (m: Wire) => void }[] = [];

  get WebSocket(): WebSocketConstructor {
    const gateway = this;
    return class extends FakeSocket {
      constructor(url: string, protocols?: string | string[]) {
        super(gateway, url, protocols);
      }
    } as unknown as WebSocketConstructor;
  }

  /** The latest socket (the client's current connection). */
  get socket(): FakeSocket {
    const s = this.sockets.at(-1);
    if (!s) throw new Error("no connection yet");
    return s;
  }

  /** Sends gateway messages to the client, as one frame (a batch). */
  send(...messages: Wire[]): void {
    this.socket.deliver(messages.map((m) => JSON.stringify(m)).join("\n"));
  }

  /** The gateway side drops the current connection (1006: no close frame, as a cut cable). */
  drop(code = 1006): void {
    this.socket.close(code);
  }

  /** The client messages received on socket `index` (0: the first connection). */
  receivedOn(index: number): Wire[] {
    return this.received.filter((_, i) => this.receivedBy[i] === this.sockets[index]);
  }

  /** Resolves with the first client message (already received or to come) matching `check`. */
  next(check: (m: Wire) => boolean): Promise<Wire> {
    const seen = this.received.find(check);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve) => this.waiters.push({ check, resolve }));
  }

  /** @internal */
  receive(socket: FakeSocket, data: string): void {
    for (const line of data.split("\n")) {
      const m = JSON.parse(line) as Wire;
      if (m.type === "hello") {
        socket.deliver(JSON.stringify({
          type: "welcome", connection_id: `fake-${this.sockets.length}`,
          limits: { max_streams: 64, max_frame_bytes: 1048576, max_batch_messages: 1024, max_timeout_ms: 600000 },
        }));
        continue;
      }
      this.received.push(m);
      this.receivedBy.push(socket);
      this.onMessage(m, this);
      for (const w of [...this.waiters]) {
        if (w.check(m)) { this.waiters.splice(this.waiters.indexOf(w), 1); w.resolve(m); }
      }
    }
  }
}

export class FakeSocket implements WebSocketLike {
  readonly protocol: string;
  readyState = 0;
  binaryType = "arraybuffer";
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  /** The close code, once closed (by the client or the fake). */
  closeCode: number | undefined;

  constructor(private readonly gateway: FakeGateway, readonly url: string, protocols?: string | string[]) {
    this.protocol = [protocols ?? []].flat()[0] ?? "";
    if (this.protocol !== "muxgate.v1.json") throw new Error("the fake gateway speaks JSON only");
    gateway.attempts.push(Date.now());
    if (gateway.refuse) {
      queueMicrotask(() => {
        this.readyState = 3;
        this.onerror?.({});
        this.onclose?.({ code: 1006, reason: "" });
      });
      return;
    }
    gateway.sockets.push(this);
    queueMicrotask(() => { this.readyState = 1; this.onopen?.({}); });
  }

  send(data: string | Uint8Array): void {
    if (this.readyState !== 1) return;
    this.gateway.receive(this, typeof data === "string" ? data : new TextDecoder().decode(data));
  }

  close(code = 1000, reason = ""): void {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    this.closeCode = code;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  /** @internal */
  deliver(data: string): void {
    if (this.readyState === 1) this.onmessage?.({ data });
  }
}
