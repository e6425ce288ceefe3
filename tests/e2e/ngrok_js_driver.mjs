// Run ngrok's JavaScript Agent SDK (npm @ngrok/ngrok) against a burrow edge: a subprocess
// of tests/e2e/test_ngrok_js_sdk.py.  The SDK is loaded from the directory in
// BURROW_NGROK_JS_SDK (its node_modules; .ci/run installs it there).  Prints one JSON line
// ({"url", "id"} or {"error", "code"}), then forwards until stdin closes, and disconnects.
// BURROW_SDK_OPTIONS (JSON) adds forward() options; {"pooling_enabled": true, "domain": D}
// builds a pooled http listener through SessionBuilder instead.
//
//   node ngrok_js_driver.mjs UPSTREAM AUTHTOKEN SERVER_ADDR CA_FILE [PROTO]
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.BURROW_NGROK_JS_SDK, "package.json"));
const ngrok = require("@ngrok/ngrok");

const [addr, authtoken, server_addr, root_cas, proto = "http"] = process.argv.slice(2);
const options = JSON.parse(process.env.BURROW_SDK_OPTIONS || "{}");
let listener;
try {
  if (options.pooling_enabled) {
    // forward() has no pooling option: build the session and the listener (http only)
    const session = await new ngrok.SessionBuilder()
      .authtoken(authtoken).serverAddr(server_addr).rootCas(root_cas).connect();
    const builder = session.httpEndpoint().poolingEnabled(true).scheme("HTTP");
    if (options.domain) builder.domain(options.domain);
    listener = await builder.listenAndForward(`http://${addr}`);
  } else {
    listener = await ngrok.forward({ addr, authtoken, server_addr, root_cas, proto, ...options });
  }
} catch (e) {
  console.log(JSON.stringify({ error: String(e), code: e.errorCode ?? null }));
  process.exit(1);
}
console.log(JSON.stringify({ url: listener.url(), id: listener.id() }));
process.stdin.resume();
process.stdin.on("end", async () => {
  await ngrok.disconnect();
  process.exit(0);
});
