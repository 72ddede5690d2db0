"""An asyncio service: concurrent requests, a streamed (async generator) response, and tasks per shard.

python examples/async_service.py
"""

from __future__ import annotations

import asyncio
import random

import inferscope


async def fetch_features(user: int) -> list[float]:
    with inferscope.stage("fetch"):
        await asyncio.sleep(random.uniform(0.001, 0.004))  # a feature-store call: waiting, not CPU
        return [random.random() for _ in range(64)]


@inferscope.track_inference(model="recommender", version="7")
async def recommend(user: int) -> list[int]:
    with inferscope.stage("preprocess"):
        # Tasks created inside a stage are attributed to it: "preprocess/fetch".
        features = await asyncio.gather(*(fetch_features(user) for _ in range(3)))
    with inferscope.stage("infer"):
        scores = [sum(f) for f in features]
    return sorted(range(len(scores)), key=scores.__getitem__)


@inferscope.track_inference(model="chat", version="1")
async def stream_reply(prompt: str):
    for word in prompt.split():
        with inferscope.stage("decode"):
            await asyncio.sleep(0.001)
        yield word


async def main() -> None:
    await asyncio.gather(*(recommend(user) for user in range(100)))
    async for _token in stream_reply("the quick brown fox jumps over the lazy dog"):
        pass
    stream = stream_reply("a client that disconnects early")
    await stream.__anext__()
    await stream.aclose()  # counted as abandoned
    print(inferscope.snapshot().table())


if __name__ == "__main__":
    asyncio.run(main())
