import { fileURLToPath } from "node:url";
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// Multi-page build into the gateway's package data: `muxgate serve` serves index.html at /,
// dashboard.html at /dashboard and assets/* as they are. The output must be reproducible (CI
// rebuilds it and diffs gateway/webui): content-hashed names, no timestamps.
export default defineConfig({
  base: "/",
  plugins: [react()],
  resolve: { alias: { "@muxgate/sdk": fileURLToPath(new URL("./sdk/src/index.ts", import.meta.url)) } },
  build: {
    outDir: "../gateway/webui",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    rollupOptions: {
      input: {
        index: fileURLToPath(new URL("./index.html", import.meta.url)),
        dashboard: fileURLToPath(new URL("./dashboard.html", import.meta.url)),
      },
    },
  },
  server: {
    // `npm run dev`: the pages talk to a gateway on the default port.
    proxy: { "/v1": { target: "http://127.0.0.1:8001", ws: true } },
  },
});
