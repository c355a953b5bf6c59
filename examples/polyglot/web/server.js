// The front end: calls the API and renders what it said. Node.js, no packages.
const http = require("http");

const port = Number(process.env.PORT);
// Injected by berth (web depends_on api): http://<api's stable address>:8000.
const api = process.env.API_URL;
const instance = process.env.BERTH_INSTANCE || "web";

const server = http.createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200, { "Content-Type": "text/plain" });
    return res.end("ok");
  }
  http
    .get(api + "/", (r) => {
      let body = "";
      r.on("data", (c) => (body += c));
      r.on("end", () => {
        let reply;
        try {
          reply = JSON.parse(body);
        } catch (e) {
          reply = { error: "bad reply from api: " + e.message };
        }
        res.writeHead(200, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ web: instance, api: reply }) + "\n");
      });
    })
    .on("error", (e) => {
      res.writeHead(502, { "Content-Type": "text/plain" });
      res.end("api unreachable: " + e.message + "\n");
    });
});

server.listen(port, "127.0.0.1", () => console.log(`${instance} listening on :${port}, api at ${api}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
