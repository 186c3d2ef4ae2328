/**
 * A tiny TCP proxy in front of a gateway, for cutting connections: `sever()` destroys every
 * proxied TCP connection at once (both sides, no WebSocket close frame: the client sees an
 * abnormal close, 1006; the gateway sees the connection end). While `blockUpgrades` is true
 * the proxy refuses WebSocket handshakes (it closes those connections at their first bytes)
 * but still passes plain HTTP (the cancel API), as a network path that lets nothing long-lived
 * through for a while. `sever({ halfOpen: true })` cuts only the client's side and leaves the
 * gateway's side open but unread, as a connection whose far end vanished without a word: the
 * gateway still counts it as attached.
 */
import net from "node:net";

export interface Proxy {
  /** ws://127.0.0.1:PORT/v1/ws through the proxy. */
  url: string;
  /** http://127.0.0.1:PORT through the proxy. */
  http: string;
  /** Refuse WebSocket handshakes while true. */
  blockUpgrades: boolean;
  /** WebSocket handshakes passed through so far. */
  readonly upgrades: number;
  /** Handshakes refused so far. */
  readonly refused: number;
  /** Cuts every proxied connection now; returns how many there were. */
  sever(options?: { halfOpen?: boolean }): number;
  close(): Promise<void>;
}

export async function startProxy(targetPort: number, targetHost = "127.0.0.1"): Promise<Proxy> {
  const pairs = new Set<[net.Socket, net.Socket]>();
  /** Gateway-side sockets left open by a half-open cut (destroyed on close). */
  const orphans = new Set<net.Socket>();
  let upgrades = 0;
  let refused = 0;
  const state = { blockUpgrades: false };
  const server = net.createServer((client) => {
    client.on("error", () => {});
    client.once("data", (first: Buffer) => {
      const upgrade = /^upgrade:\s*websocket/im.test(first.toString("latin1"));
      if (upgrade && state.blockUpgrades) {
        refused++;
        client.destroy();
        return;
      }
      if (upgrade) upgrades++;
      client.pause();
      const upstream = net.connect(targetPort, targetHost);
      const pair: [net.Socket, net.Socket] = [client, upstream];
      pairs.add(pair);
      upstream.on("error", () => client.destroy());
      client.on("error", () => upstream.destroy());
      const forget = () => { pairs.delete(pair); client.destroy(); upstream.destroy(); };
      client.on("close", forget);
      upstream.on("close", forget);
      upstream.write(first);
      client.pipe(upstream);
      upstream.pipe(client);
      client.resume();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  const sever = (options: { halfOpen?: boolean } = {}) => {
    const n = pairs.size;
    for (const [a, b] of [...pairs]) {
      if (options.halfOpen) {
        a.removeAllListeners("close");
        b.removeAllListeners("close");
        a.unpipe(b);
        b.unpipe(a);
        b.pause(); // unread: the gateway's writes pile up in the TCP buffers
        orphans.add(b);
      } else {
        b.destroy();
      }
      a.destroy();
    }
    pairs.clear();
    return n;
  };
  return {
    url: `ws://127.0.0.1:${port}/v1/ws`,
    http: `http://127.0.0.1:${port}`,
    get blockUpgrades() { return state.blockUpgrades; },
    set blockUpgrades(v: boolean) { state.blockUpgrades = v; },
    get upgrades() { return upgrades; },
    get refused() { return refused; },
    sever,
    async close() {
      sever();
      for (const s of orphans) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
