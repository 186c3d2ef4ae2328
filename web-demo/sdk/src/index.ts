/**
 * @muxgate/sdk: the TypeScript SDK of the muxgate gateway (browsers and Node 20+).
 *
 * ```ts
 * import { Muxi } from "@muxgate/sdk";
 * const client = new Muxi({ url: "ws://127.0.0.1:8001" });
 * for await (const chunk of client.chatStream({ message: "Hello" })) console.log(chunk.text);
 * ```
 */
export { Muxi, ChatStream, gatewayUrls, reconnectDelay, RECONNECT_DEFAULTS } from "./client.js";
export type { MuxiOptions, ReconnectOptions, ConnectionState } from "./client.js";
export type { WebSocketConstructor, WebSocketLike } from "./connection.js";
export * from "./errors.js";
export type * from "./types.js";
export { decode, encode, encodeBatch, joinBatch, SUBPROTOCOLS } from "./codec.js";
export type { CodecName } from "./codec.js";
export * as limits from "./limits.js";
export { checkOutgoing, parseMessage, Float64, ExtValue, USAGE_FIGURES } from "./wire.js";
export type {
  Message, ClientMessage, GatewayMessage, Sender, CancelStatus, CancelReason, ResponseStatus, Role, JsonValue,
  StepMessage, WireHalt, ResumeStatus, ResumeMessage, ResumableMessage, ResumeResultMessage, MovedMessage,
} from "./wire.js";
