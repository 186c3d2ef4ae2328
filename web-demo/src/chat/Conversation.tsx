import { type ChatStream, type Halt, type JsonValue, type Muxi, type Response, type Step } from "@muxgate/sdk";
import { useRef, useState } from "react";
import { haltLabel, stepLabel } from "./labels";

interface Turn {
  requestId: string;
  prompt: string;
  answer: string;
  chunks: number;
  state: "streaming" | "completed" | "cancelled" | "failed";
  /** The latest started step not yet ended (SPEC.md §3.12), while the answer runs. */
  step?: Step;
  /** The step the answer was in when it was stopped. */
  stoppedIn?: Step;
  /** Steps started so far. */
  started: number;
  /** Stop was pressed; the cancelled response has not arrived yet. */
  stopping?: boolean;
  response?: Response;
  /** The latest halt: the cancelled response's (often pending), then the final one. */
  halt?: Halt;
  savedTokens?: number;
  /** The usage figures are final (the pipeline halted). */
  usageFinal?: boolean;
  cancelStatus?: string;
  error?: string;
}

let counter = 0;

/** One conversation: a column of turns; its requests share the page's one WebSocket. While an
 * answer streams, Stop replaces Send; the answer shows the step it is in, and after Stop where
 * the pipeline halts. */
export function Conversation({ index, client, metadata }: { index: number; client: Muxi; metadata: { [key: string]: JsonValue } }) {
  const [turns, setTurns] = useState<Turn[]>([]);
  const [input, setInput] = useState("Write a very long story...");
  const running = useRef<string | null>(null);
  const [busy, setBusy] = useState(false);

  const update = (requestId: string, change: (t: Turn) => Partial<Turn>) =>
    setTurns((all) => all.map((t) => (t.requestId === requestId ? { ...t, ...change(t) } : t)));

  const send = async (message: string) => {
    const requestId = `conv${index}-${Date.now().toString(36)}-${counter++}`;
    running.current = requestId;
    setBusy(true);
    setTurns((all) => [...all, { requestId, prompt: message, answer: "", chunks: 0, started: 0, state: "streaming" }]);
    const stream: ChatStream = client.chatStream({
      message,
      requestId,
      metadata,
      steps: true,
      onStep: () => update(requestId, () => ({ step: stream.currentStep, started: stream.steps.filter((s) => s.state === "started").length })),
      onHalt: (halt, usage) => update(requestId, () => ({ halt, savedTokens: usage.savedTokens, usageFinal: usage.final })),
    });
    try {
      for await (const chunk of stream) {
        update(requestId, (t) => ({ answer: t.answer + chunk.text, chunks: t.chunks + 1 }));
      }
      const response = stream.response!;
      update(requestId, (t) => ({
        state: response.status, response, stopping: false, savedTokens: response.usage.savedTokens, usageFinal: response.usage.final,
        step: undefined, stoppedIn: response.status === "cancelled" ? t.step : undefined,
      }));
      release(requestId); // the answer is over: Send again (its pipeline may still be halting)
      if (response.status === "cancelled" && !response.usage.final) {
        // The pipeline ran on to its next checkpoint: the final figures follow (SPEC.md §5.4).
        const usage = await client.finalUsage(response).catch(() => response.usage);
        update(requestId, () => ({ savedTokens: usage.savedTokens, usageFinal: true }));
      }
    } catch (exc) {
      update(requestId, () => ({ state: "failed", stopping: false, step: undefined, error: exc instanceof Error ? exc.message : String(exc) }));
    } finally {
      release(requestId);
    }
  };

  const release = (requestId: string) => {
    if (running.current === requestId) {
      running.current = null;
      setBusy(false);
    }
  };

  const stop = async () => {
    const requestId = running.current;
    if (!requestId) return;
    update(requestId, () => ({ stopping: true }));
    const status = await client.cancelRequest(requestId);
    update(requestId, () => ({ cancelStatus: status }));
  };

  const last = turns.at(-1);
  return (
    <section className="conversation" data-testid={`conversation-${index}`}>
      <h2>
        <span>Conversation {index + 1}</span>
      </h2>
      <div data-testid="turns">
      {turns.map((t) => (
        <div key={t.requestId} data-testid="turn" data-request-id={t.requestId} data-state={t.state}>
          <div className="turn user">› {t.prompt}</div>
          <div className="answer" data-testid="answer" data-chunks={t.chunks} style={t.state === "cancelled" ? { color: "#6e7781" } : undefined}>
            {t.answer}
          </div>
          <div className={`status ${t.state}`} data-testid="status">
            {t.state === "streaming" && (
              <>
                {t.step ? (
                  <span className="step" data-testid="step" data-step-kind={t.step.kind} data-step-name={t.step.name}>
                    {stepLabel(t.step)}
                  </span>
                ) : (
                  t.started === 0 && <span className="step" data-testid="step">starting…</span>
                )}{" "}
                {t.stopping ? <span data-testid="stopping">stopping…</span> : `${t.chunks} chunks`}
              </>
            )}
            {t.state === "completed" && `completed: ${t.response?.usage.outputTokens} tokens`}
            {t.state === "cancelled" && (
              <>
                <span data-testid="cancelled">cancelled</span> (reason: <span data-testid="reason">{t.response?.reason}</span>) —{" "}
                {t.halt && (
                  <>
                    <span className={`halt ${t.halt.state}`} data-testid="halt" data-halt-state={t.halt.state} data-aborted={String(t.halt.aborted)}>
                      {haltLabel(t.halt, t.stoppedIn)}
                    </span>
                    {t.usageFinal && " — "}
                  </>
                )}
                {(t.usageFinal || !t.halt) && (
                  <>
                    <span data-testid="saved">{t.savedTokens}</span> tokens saved
                  </>
                )}
                ; the partial text above is not the answer
                {t.cancelStatus && ` [cancelRequest: ${t.cancelStatus}]`}
              </>
            )}
            {t.state === "failed" && `failed: ${t.error ?? t.response?.error?.message}`}
          </div>
        </div>
      ))}
      </div>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          if (busy) void stop();
          else if (input.trim()) void send(input.trim());
        }}
      >
        <input value={input} onChange={(e) => setInput(e.target.value)} data-testid="input" disabled={busy} />
        {busy ? (
          <button type="submit" className="stop" data-testid="stop" disabled={last?.stopping} title="Stop the answer (cancels the request)">
            ■ Stop
          </button>
        ) : (
          <button type="submit" data-testid="send">
            Send
          </button>
        )}
      </form>
    </section>
  );
}
