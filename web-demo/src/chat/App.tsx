/**
 * The chat demo: several conversations side by side, all multiplexed over ONE WebSocket (one
 * `Muxi` client for the page). Tokens stream in; a Cancel button is shown while a request runs;
 * a cancelled answer shows the status, the reason and the tokens saved, and stops growing.
 * The speed settings go to the simulated backend as the chat's `metadata`.
 */
import { type ConnectionState, type JsonValue, Muxi } from "@muxgate/sdk";
import { useEffect, useMemo, useState } from "react";
import { ChatInterface } from "../seed/ChatInterface";
import { Conversation } from "./Conversation";

export interface Speed {
  tokens: number;
  token_delay_ms: number;
  plan_ms: number;
}

function initialCodec(): "json" | "msgpack" {
  return new URLSearchParams(location.search).get("codec") === "msgpack" ? "msgpack" : "json";
}

export function App() {
  const [connection, setConnection] = useState<ConnectionState>({ connected: false });
  const client = useMemo(
    () => new Muxi({ codec: initialCodec(), onConnectionChange: (state) => setConnection(state) }),
    [],
  );
  useEffect(() => () => client.close(), [client]);
  const [speed, setSpeed] = useState<Speed>({ tokens: 400, token_delay_ms: 30, plan_ms: 100 });
  const [count, setCount] = useState(2);
  const metadata = speed as unknown as { [key: string]: JsonValue };

  const setting = (key: keyof Speed, label: string, max: number) => (
    <label>
      {label}
      <input
        type="number"
        min={0}
        max={max}
        value={speed[key]}
        data-testid={`speed-${key}`}
        onChange={(e) => setSpeed({ ...speed, [key]: Math.max(0, Math.min(max, Number(e.target.value) || 0)) })}
      />
    </label>
  );

  return (
    <>
      <header>
        <h1>muxgate chat</h1>
        <nav>
          <a href="/">Chat</a>
          <a href="/dashboard">Dashboard</a>
        </nav>
        <span className={`conn ${connection.connected ? "up" : "down"}`} data-testid="connection">
          {connection.connected
            ? `one WebSocket (${client.codec}), connection ${connection.connectionId}`
            : connection.error
              ? `disconnected: ${connection.error.message} (reconnects on the next message)`
              : "not connected yet (connects on the first message)"}
        </span>
      </header>
      <main>
        <div className="settings">
          <strong>Simulated backend speed</strong>
          {setting("tokens", "answer tokens", 100000)}
          {setting("token_delay_ms", "ms per token", 10000)}
          {setting("plan_ms", "planning ms", 10000)}
          <button onClick={() => setCount(count + 1)} data-testid="add-conversation">
            Add conversation
          </button>
        </div>
        <div className="conversations">
          {Array.from({ length: count }, (_, i) => (
            <Conversation key={i} index={i} client={client} metadata={metadata} />
          ))}
        </div>
        <section className="panel" style={{ marginTop: 16 }} data-testid="seed-example">
          <h2>The seed page's ChatInterface component (its own client, same gateway)</h2>
          <ChatInterface />
        </section>
      </main>
    </>
  );
}
