import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  resolve: { alias: { "@muxgate/sdk": fileURLToPath(new URL("./sdk/src/index.ts", import.meta.url)) } },
  test: {
    projects: [
      { extends: true, test: { name: "unit", include: ["test/unit/**/*.test.ts"] } },
      { extends: true, test: { name: "gateway", include: ["test/gateway/**/*.test.ts"], testTimeout: 30_000, hookTimeout: 30_000 } },
      // Against the built pages in ../gateway/webui: run `npm run build` first (npm test does).
      { extends: true, test: { name: "browser", include: ["test/browser/**/*.test.ts"], testTimeout: 60_000, hookTimeout: 60_000 } },
    ],
  },
});
