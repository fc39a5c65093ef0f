// The app the image runs: `node /opt/app/server.js`, listening on port 3000.
const http = require("http");

const port = Number(process.env.PORT || 3000);

http
  .createServer((request, response) => {
    response.writeHead(200, { "content-type": "text/plain; charset=utf-8" });
    response.end("hello from a reproducible mkosi image\n");
  })
  .listen(port, () => console.log(`listening on ${port}`));
