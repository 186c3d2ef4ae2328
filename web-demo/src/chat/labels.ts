/** Words for pipeline steps and halts (SPEC.md §3.12) as the chat demo shows them. */
import type { Halt, StepInfo } from "@muxgate/sdk";

/** What a running step is doing: "planning…", "answering…", "calling tool search…". */
export function stepLabel(step: StepInfo): string {
  switch (step.kind) {
    case "plan":
      return "planning…";
    case "llm_stream":
    case "llm":
      return step.name === "answer" ? "answering…" : `answering (${step.name})…`;
    case "tool":
      return `calling tool ${step.name}…`;
    case "agent":
      return `asking agent ${step.name}…`;
    default:
      return `${step.kind} ${step.name}…`; // kinds are open: show what the gateway said
  }
}

/** The step as the object of "after ...": "the tool call search", "planning". */
function stepPhrase(step: StepInfo): string {
  switch (step.kind) {
    case "plan":
      return "planning";
    case "tool":
      return `the tool call ${step.name}`;
    case "agent":
      return `the agent call ${step.name}`;
    case "llm":
    case "llm_stream":
      return `the model call ${step.name}`;
    default:
      return `${step.kind} ${step.name}`;
  }
}

/**
 * The halt of a stopped answer: while `pending`, what the pipeline still finishes ("stopping
 * after the tool call search…"; without a step to wait for, "stopping the model…" when `running`,
 * the step the answer was in, is an LLM stream); once `halted`, where it stopped ("halted after
 * search", "model stopped during answer").
 */
export function haltLabel(halt: Halt, running?: StepInfo): string {
  if (halt.state === "pending") {
    if (halt.step) return `stopping after ${stepPhrase(halt.step)}…`;
    return running?.kind === "llm_stream" ? "stopping the model…" : "stopping at the next checkpoint…";
  }
  if (!halt.step) return "halted before any step";
  if (halt.aborted) {
    return halt.step.kind === "llm_stream" || halt.step.kind === "llm"
      ? `model stopped during ${halt.step.name}`
      : `stopped during ${halt.step.name}`;
  }
  return `halted after ${halt.step.name}`;
}
