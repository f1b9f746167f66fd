"""A mitmproxy addon (run by mitmdump, not by pytest) for tests/conftest.py's FaultProxy: mitmdump forwards every
request to the real engine behind it, and this spoils the exchange in the ways a real engine cannot be made to on
demand. Options (mitmdump --set NAME=VALUE):
  refuse     answer 429 to the first N requests (-1: to all) instead of forwarding them
  delay_ms   wait this long before forwarding a request
  cut        answer with the first half of the engine's reply
  count_file append one line to this file per request received
"""
import asyncio

from mitmproxy import ctx, http

TOO_MANY = b'{"error": {"message": "Too many requests (proxy)"}}'


class Faults:
    def __init__(self):
        self.received = 0

    def load(self, loader):
        loader.add_option("refuse", int, 0, "429 to the first N requests (-1: all)")
        loader.add_option("delay_ms", int, 0, "milliseconds to wait before forwarding")
        loader.add_option("cut", bool, False, "answer with half of the engine's reply")
        loader.add_option("count_file", str, "", "one line per request received")

    async def request(self, flow):
        self.received += 1
        if ctx.options.count_file:
            with open(ctx.options.count_file, "a") as f:
                f.write(f"{flow.request.method} {flow.request.path}\n")
        if ctx.options.refuse < 0 or self.received <= ctx.options.refuse:
            flow.response = http.Response.make(429, TOO_MANY, {"Content-Type": "application/json"})
            flow.metadata["refused"] = True
        elif ctx.options.delay_ms:
            await asyncio.sleep(ctx.options.delay_ms / 1000)

    def response(self, flow):
        if ctx.options.cut and not flow.metadata.get("refused"):
            flow.response.content = flow.response.content[: len(flow.response.content) // 2]


addons = [Faults()]
