/**
 * The chat demo: several conversations side by side, all multiplexed over ONE WebSocket (one
 * `Muxi` client for the page). Tokens stream in; Stop replaces Send while an answer runs; each
 * answer shows its pipeline's current step, and a stopped one where the pipeline halts, its
 * reason and the tokens saved, and stops growing.
 *
 * The page asks the gateway which backend it runs (`GET /v1/backend`): for the simulated and
 * echo backends the speed settings go to the backend as the chat's `metadata`; for a model
 * (openai, llama) the model's settings the backend announces do (e.g. `max_tokens`,
 * `temperature`), within their bounds.
 *
 * The answers survive a dropped connection and a page reload (SPEC.md §5.8): every chat is
 * resumable, the SDK resumes it by itself after a drop, and the page keeps its conversations
 * in `sessionStorage` and resumes the answers that were streaming when it was reloaded.
 */
import { type ConnectionState, type JsonValue, Muxi } from "@muxgate/sdk";
import { useEffect, useMemo, useState } from "react";
import { ChatInterface } from "../seed/ChatInterface";
import { type BackendInfo, SIMULATED, clampSetting, fetchBackendInfo, isSimulated, settingsMetadata } from "./backend";
import { Conversation } from "./Conversation";
import { loadCount, pageStorage, saveCount } from "./saved";

export interface Speed {
  tokens: number;
  token_delay_ms: number;
  plan_ms: number;
  tool_ms: number;
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
  const [speed, setSpeed] = useState<Speed>({ tokens: 400, token_delay_ms: 30, plan_ms: 100, tool_ms: 300 });
  const [count, setCount] = useState(() => loadCount(pageStorage(), 2));
  useEffect(() => saveCount(pageStorage(), count), [count]);
  const [backend, setBackend] = useState<BackendInfo & { known: boolean }>({ ...SIMULATED, known: false });
  // The model settings as typed (strings, so that "0." can become "0.5"); clamped when sent.
  const [values, setValues] = useState<Record<string, string>>({});
  useEffect(() => {
    let live = true;
    void fetchBackendInfo().then((info) => {
      if (!live) return;
      setBackend({ ...info, known: true });
      setValues(Object.fromEntries(info.settings.map((s) => [s.name, s.default === undefined ? "" : String(s.default)])));
    });
    return () => { live = false; };
  }, []);
  const simulated = isSimulated(backend);
  const metadata: { [key: string]: JsonValue } = simulated
    ? (speed as unknown as { [key: string]: JsonValue })
    : settingsMetadata(backend.settings, Object.fromEntries(backend.settings.map((s) => [s.name, clampSetting(s, values[s.name] ?? "")])));

  const setting = (key: keyof Speed, label: string, fallbackMax: number) => {
    const announced = backend.settings.find((s) => s.name === key); // the gateway's bounds, if told
    const max = announced?.max ?? fallbackMax;
    return (
      <label title={announced?.description}>
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
  };

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
            : connection.resuming
              ? `disconnected: ${connection.error?.message}; reconnecting to resume ${connection.resuming} answer${connection.resuming > 1 ? "s" : ""}…`
              : connection.error
                ? `disconnected: ${connection.error.message} (reconnects on the next message)`
                : "not connected yet (connects on the first message)"}
        </span>
      </header>
      <main>
        <div className="settings" data-testid="settings" data-backend={backend.backend} data-backend-known={String(backend.known)}>
          {simulated ? (
            <>
              <strong>{backend.backend === "echo" ? "Echo" : "Simulated"} backend speed</strong>
              {setting("tokens", "answer tokens", 100000)}
              {setting("token_delay_ms", "ms per token", 10000)}
              {setting("plan_ms", "planning ms", 10000)}
              {setting("tool_ms", "tool call ms", 10000)}
            </>
          ) : (
            <>
              <strong data-testid="backend-model">
                Model: {backend.model ?? "(not named by the gateway)"} <span className="backend-name">({backend.backend} backend)</span>
              </strong>
              {backend.settings.map((s) => (
                <label key={s.name}>
                  {s.name}
                  <input
                    type="number"
                    min={s.min}
                    max={s.max}
                    step={s.type === "integer" ? 1 : 0.1}
                    value={values[s.name] ?? ""}
                    placeholder="default"
                    title={s.description}
                    data-testid={`setting-${s.name}`}
                    onChange={(e) => setValues({ ...values, [s.name]: e.target.value })}
                    onBlur={(e) => setValues({ ...values, [s.name]: String(clampSetting(s, e.target.value) ?? "") })}
                  />
                </label>
              ))}
            </>
          )}
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
