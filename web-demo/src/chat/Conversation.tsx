import { type JsonValue, type Muxi, type Response } from "@muxgate/sdk";
import { useRef, useState } from "react";

interface Turn {
  requestId: string;
  prompt: string;
  answer: string;
  chunks: number;
  state: "streaming" | "completed" | "cancelled" | "failed";
  response?: Response;
  savedTokens?: number;
  cancelStatus?: string;
  error?: string;
}

let counter = 0;

/** One conversation: a column of turns; its requests share the page's one WebSocket. */
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
    setTurns((all) => [...all, { requestId, prompt: message, answer: "", chunks: 0, state: "streaming" }]);
    const stream = client.chatStream({ message, requestId, metadata });
    try {
      for await (const chunk of stream) {
        update(requestId, (t) => ({ answer: t.answer + chunk.text, chunks: t.chunks + 1 }));
      }
      const response = stream.response!;
      update(requestId, () => ({ state: response.status, response, savedTokens: response.usage.savedTokens }));
      if (response.status === "cancelled" && !response.usage.final) {
        // The pipeline ran on to its next checkpoint: the final figures follow (SPEC.md §5.4).
        const usage = await client.finalUsage(response).catch(() => response.usage);
        update(requestId, () => ({ savedTokens: usage.savedTokens }));
      }
    } catch (exc) {
      update(requestId, () => ({ state: "failed", error: exc instanceof Error ? exc.message : String(exc) }));
    } finally {
      running.current = null;
      setBusy(false);
    }
  };

  const cancel = async () => {
    const requestId = running.current;
    if (!requestId) return;
    const status = await client.cancelRequest(requestId);
    update(requestId, () => ({ cancelStatus: status }));
  };

  return (
    <section className="conversation" data-testid={`conversation-${index}`}>
      <h2>
        <span>Conversation {index + 1}</span>
        {busy && (
          <button className="cancel" onClick={cancel} data-testid="cancel">
            Cancel
          </button>
        )}
      </h2>
      <div data-testid="turns">
      {turns.map((t) => (
        <div key={t.requestId} data-testid="turn" data-request-id={t.requestId} data-state={t.state}>
          <div className="turn user">› {t.prompt}</div>
          <div className="answer" data-testid="answer" data-chunks={t.chunks} style={t.state === "cancelled" ? { color: "#6e7781" } : undefined}>
            {t.answer}
          </div>
          <div className={`status ${t.state}`} data-testid="status">
            {t.state === "streaming" && `streaming… ${t.chunks} chunks`}
            {t.state === "completed" && `completed: ${t.response?.usage.outputTokens} tokens`}
            {t.state === "cancelled" && (
              <>
                <span data-testid="cancelled">cancelled</span> (reason: <span data-testid="reason">{t.response?.reason}</span>) —{" "}
                <span data-testid="saved">{t.savedTokens}</span> tokens saved; the partial text above is not the answer
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
          if (!busy && input.trim()) void send(input.trim());
        }}
      >
        <input value={input} onChange={(e) => setInput(e.target.value)} data-testid="input" disabled={busy} />
        <button type="submit" disabled={busy} data-testid="send">
          Send
        </button>
      </form>
    </section>
  );
}
