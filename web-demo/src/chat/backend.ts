/**
 * What the gateway's backend is and which chat `metadata` settings it accepts:
 * `GET /v1/backend` → `{"backend": "simulated"|"echo"|"openai"|"llama", "model": string|null,
 * "settings": [{"name", "type": "integer"|"number", "min", "max", "default"?, "description"?}]}`.
 * A gateway without the endpoint (404), or any failure to read it, counts as the simulated
 * backend. A setting without a default is left empty (not sent: the backend's own default).
 */
import type { JsonValue } from "@muxgate/sdk";

export interface BackendSetting {
  name: string;
  type: "integer" | "number";
  min: number;
  max: number;
  default?: number;
  description?: string;
}

export interface BackendInfo {
  backend: string;
  model: string | null;
  settings: BackendSetting[];
}

export const SIMULATED: BackendInfo = { backend: "simulated", model: null, settings: [] };

/** Backends without a model behind them: the demo shows its own speed controls for them. */
export function isSimulated(info: BackendInfo): boolean {
  return info.backend === "simulated" || info.backend === "echo";
}

function setting(v: unknown): BackendSetting | undefined {
  if (typeof v !== "object" || v === null) return undefined;
  const s = v as Record<string, unknown>;
  const num = (x: unknown) => typeof x === "number" && Number.isFinite(x);
  if (typeof s.name !== "string" || !s.name || (s.type !== "integer" && s.type !== "number")) return undefined;
  if (!num(s.min) || !num(s.max) || (s.min as number) > (s.max as number)) return undefined;
  const min = s.min as number;
  const max = s.max as number;
  const out: BackendSetting = { name: s.name, type: s.type, min, max };
  if (num(s.default)) out.default = Math.min(max, Math.max(min, s.default as number));
  if (typeof s.description === "string" && s.description) out.description = s.description;
  return out;
}

/** Reads the body of `GET /v1/backend`; anything malformed counts as simulated. */
export function parseBackendInfo(body: unknown): BackendInfo {
  if (typeof body !== "object" || body === null) return SIMULATED;
  const b = body as Record<string, unknown>;
  if (typeof b.backend !== "string" || !b.backend) return SIMULATED;
  const settings = Array.isArray(b.settings) ? b.settings.map(setting).filter((s) => s !== undefined) : [];
  return { backend: b.backend, model: typeof b.model === "string" && b.model ? b.model : null, settings };
}

export async function fetchBackendInfo(fetcher: typeof fetch = fetch): Promise<BackendInfo> {
  try {
    const res = await fetcher("/v1/backend", { headers: { Accept: "application/json" } });
    if (!res.ok) return SIMULATED; // 404: a gateway from before the endpoint
    return parseBackendInfo(await res.json());
  } catch {
    return SIMULATED;
  }
}

/** A setting's input value clamped to its bounds (integers rounded); `undefined` if not a number. */
export function clampSetting(s: BackendSetting, raw: string): number | undefined {
  if (raw.trim() === "") return undefined;
  let v = Number(raw);
  if (!Number.isFinite(v)) return undefined;
  if (s.type === "integer") v = Math.round(v);
  return Math.min(s.max, Math.max(s.min, v));
}

/** The chat metadata for the model settings' current values (unset ones omitted). */
export function settingsMetadata(
  settings: BackendSetting[],
  values: Record<string, number | undefined>,
): { [key: string]: JsonValue } {
  const out: { [key: string]: JsonValue } = {};
  for (const s of settings) {
    const v = values[s.name];
    if (v !== undefined) out[s.name] = v;
  }
  return out;
}
