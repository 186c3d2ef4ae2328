import { type ChatStream, type Halt, type JsonValue, type Muxi, type Step, type Usage } from "@muxgate/sdk";
import { useEffect, useRef, useState } from "react";
import { haltLabel, stepLabel } from "./labels";
import { type Turn, loadTurns, pageStorage, saveTurns } from "./saved";

let counter = 0;

/** One conversation: a column of turns; its requests share the page's one WebSocket. While an
 * answer streams, Stop replaces Send; the answer shows the step it is in, and after Stop where
 * the pipeline halts.
 *
 * Every chat is resumable (SPEC.md §5.8): the SDK resumes it by itself when the WebSocket drops,
 * and the page keeps each turn in `sessionStorage` (see `saved.ts`), so that after a reload
 * mid-answer it resumes the answer from the last chunk shown: the text goes on where it was,
 * and Stop cancels the resumed request. */
export function Conversation({ index, client, metadata }: { index: number; client: Muxi; metadata: { [key: string]: JsonValue } }) {
  const [turns, setTurns] = useState<Turn[]>(() => loadTurns(pageStorage(), index));
  const [input, setInput] = useState("Write a very long story...");
  const running = useRef<string | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => saveTurns(pageStorage(), index, turns), [index, turns]);

  const update = (requestId: string, change: (t: Turn) => Partial<Turn>) =>
    setTurns((all) => all.map((t) => (t.requestId === requestId ? { ...t, ...change(t) } : t)));

  /** Shows `stream`'s answer in turn `requestId` until it ends (a new chat, or a resume). */
  const follow = async (requestId: string, stream: ChatStream) => {
    running.current = requestId;
    setBusy(true);
    try {
      for await (const chunk of stream) {
        // The text and the seq of its last chunk change together: what a reload resumes from.
        update(requestId, (t) => ({ answer: t.answer + chunk.text, chunks: t.chunks + 1, lastSeq: chunk.seq }));
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

  /** The callbacks of turn `requestId`'s stream: its current step, where it halts. */
  const observers = (requestId: string, stream: () => ChatStream) => ({
    onStep: (step: Step) =>
      update(requestId, (t) => ({ step: stream().currentStep, started: t.started + (step.state === "started" ? 1 : 0) })),
    onHalt: (halt: Halt, usage: Usage) => update(requestId, () => ({ halt, savedTokens: usage.savedTokens, usageFinal: usage.final })),
  });

  const send = (message: string) => {
    const requestId = `conv${index}-${Date.now().toString(36)}-${counter++}`;
    setTurns((all) => [...all, { requestId, prompt: message, answer: "", chunks: 0, started: 0, state: "streaming" }]);
    const stream: ChatStream = client.chatStream({
      message,
      requestId,
      metadata,
      steps: true,
      resumable: true,
      onResumable: (info) => update(requestId, () => ({ epoch: info.epoch })),
      ...observers(requestId, () => stream),
    });
    void follow(requestId, stream);
  };

  /** After a reload: the answer of `turn` was streaming; resume it where the page left it. */
  const resume = (turn: Turn) => {
    const { requestId } = turn;
    if (turn.epoch === undefined) {
      // Reloaded before the gateway made it resumable: it cannot be continued; stop it.
      void client.cancelRequest(requestId).catch(() => undefined);
      update(requestId, () => ({ state: "failed", step: undefined, error: "the page was reloaded before the answer could be resumed" }));
      return;
    }
    let stream: ChatStream;
    try {
      stream = client.resumeStream({ requestId, epoch: turn.epoch, afterSeq: turn.lastSeq, ...observers(requestId, () => stream) });
    } catch (exc) {
      update(requestId, () => ({ state: "failed", step: undefined, error: exc instanceof Error ? exc.message : String(exc) }));
      return;
    }
    update(requestId, (t) => ({ reloads: (t.reloads ?? 0) + 1 }));
    void follow(requestId, stream);
    // A Stop pressed just before the reload may not have reached the gateway: send it again.
    if (turn.stopping) void stop(requestId).catch(() => undefined);
  };

  // On mount (a reload): resume the answers that were streaming. Once, even under StrictMode.
  const resumed = useRef(false);
  useEffect(() => {
    if (resumed.current) return;
    resumed.current = true;
    for (const turn of turns) if (turn.state === "streaming") resume(turn);
  }, []); // the turns as loaded, once

  const release = (requestId: string) => {
    if (running.current === requestId) {
      running.current = null;
      setBusy(false);
    }
  };

  const stop = async (requestId = running.current) => {
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
        <div key={t.requestId} data-testid="turn" data-request-id={t.requestId} data-state={t.state} data-reloads={t.reloads ?? 0}>
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
                {t.reloads ? <span data-testid="resumed"> (resumed after a reload)</span> : null}
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
