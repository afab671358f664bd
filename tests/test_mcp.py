"""`--mcp`: an AI assistant's MCP client (the `mcp` package) lists the app's tools and classifies images."""
import ast
import asyncio
import base64

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import served, write_image
from imagelab.inference import Predictor


def data_url(image):
    kind = {".jpg": "jpeg", ".png": "png"}[image.suffix]
    return f"data:image/{kind};base64,{base64.b64encode(image.read_bytes()).decode()}"


async def session_calls(url, tool, images):
    """The tools listed, and the tool's answer for each image, over one MCP session as a client makes them."""
    async with streamable_http_client(url + "gradio_api/mcp/") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            return tools, [await session.call_tool(tool, {"image": data_url(im)}) for im in images]


def test_mcp_client_lists_predict_and_gets_the_models_label(tiny_model, tmp_path):
    images = [write_image(tmp_path / "red.jpg", (220, 60, 60), size=(120, 90)),
              write_image(tmp_path / "blue.png", (60, 60, 220), size=(120, 90))]
    with served(["apps/pets/app.py", "--model", tiny_model, "--mcp"]) as url:
        tools, results = asyncio.run(session_calls(url, "predict", images))
    # What an assistant reads to pick the tool: what the model tells apart.
    assert "cats" in tools["predict"].description and "dogs" in tools["predict"].description
    assert "flag" not in tools  # flagging is off unless the app's owner turns it on
    expected = Predictor(tiny_model)
    for image, result in zip(images, results):
        assert not result.isError, result.content
        answer = ast.literal_eval(result.content[0].text)
        want = expected.predict(image, k=3)
        assert answer["label"] == max(want, key=want.get)
        assert {c["label"]: c["confidence"] for c in answer["confidences"]} == pytest.approx(want, abs=1e-5)
