/**
 * What the chat demo keeps in `sessionStorage` so that a page reload mid-answer loses nothing
 * (SPEC.md §5.8): each conversation's turns, and for an answer still streaming its request id,
 * its epoch (from the `resumable` message) and the seq of the last chunk shown, saved together
 * with the text shown so far. After the reload the page resumes each such answer with
 * `resumeStream({ requestId, epoch, afterSeq: lastSeq })`: the gateway sends the chunks after
 * `lastSeq`, which continue the saved text exactly (the text and the seq are written in one
 * item, so they always agree). `sessionStorage` is per tab and survives a reload, not a new tab.
 */
import type { Halt, Response, Step } from "@muxgate/sdk";

export interface Turn {
  requestId: string;
  prompt: string;
  answer: string;
  chunks: number;
  state: "streaming" | "completed" | "cancelled" | "failed";
  /** The request's epoch (SPEC.md §3.13), once the gateway made it resumable. */
  epoch?: string;
  /** The seq of the last chunk in `answer`: a resume continues after it. */
  lastSeq?: number;
  /** How many times the answer was resumed after a page reload. */
  reloads?: number;
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

export const PREFIX = "muxgate-demo:";
/** Turns kept per conversation (the oldest finished ones go first). */
export const MAX_TURNS = 50;

/** The page's `sessionStorage`, or undefined where there is none (tests, a locked-down browser). */
export function pageStorage(): Storage | undefined {
  try {
    return globalThis.sessionStorage ?? undefined;
  } catch {
    return undefined;
  }
}

function isTurn(t: unknown): t is Turn {
  if (typeof t !== "object" || t === null) return false;
  const o = t as Record<string, unknown>;
  return typeof o.requestId === "string" && typeof o.prompt === "string" && typeof o.answer === "string"
    && typeof o.chunks === "number" && typeof o.started === "number"
    && ["streaming", "completed", "cancelled", "failed"].includes(o.state as string)
    && (o.epoch === undefined || typeof o.epoch === "string")
    && (o.lastSeq === undefined || (Number.isInteger(o.lastSeq) && (o.lastSeq as number) >= 0));
}

/** Conversation `index`'s saved turns ([] if none, or unreadable). */
export function loadTurns(storage: Storage | undefined, index: number): Turn[] {
  try {
    const raw = storage?.getItem(`${PREFIX}conversation:${index}`);
    if (!raw) return [];
    const parsed: unknown = JSON.parse(raw);
    return Array.isArray(parsed) ? parsed.filter(isTurn) : [];
  } catch {
    return [];
  }
}

/** Saves conversation `index`'s turns (the last {@link MAX_TURNS}). If the storage is full,
 * keeps at least the answers still streaming: they are what a reload resumes. */
export function saveTurns(storage: Storage | undefined, index: number, turns: Turn[]): void {
  if (!storage) return;
  const key = `${PREFIX}conversation:${index}`;
  try {
    storage.setItem(key, JSON.stringify(turns.slice(-MAX_TURNS)));
  } catch {
    try {
      storage.setItem(key, JSON.stringify(turns.filter((t) => t.state === "streaming")));
    } catch {
      /* nothing fits: a reload starts afresh */
    }
  }
}

/** How many conversations the page shows (`fallback` if not saved). */
export function loadCount(storage: Storage | undefined, fallback: number): number {
  try {
    const n = Number(storage?.getItem(`${PREFIX}count`));
    return Number.isInteger(n) && n >= 1 && n <= 100 ? n : fallback;
  } catch {
    return fallback;
  }
}

export function saveCount(storage: Storage | undefined, count: number): void {
  try {
    storage?.setItem(`${PREFIX}count`, String(count));
  } catch {
    /* not kept */
  }
}
