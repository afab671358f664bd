"""`--mcp`: an AI assistant's MCP client (the `mcp` package) lists the app's tools and classifies an image."""
import ast
import asyncio
import base64

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from conftest import served, write_image
from imagelab.inference import Predictor


async def tools_and_call(url, tool, arguments):
    async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            return tools, await session.call_tool(tool, arguments)


def test_mcp_client_lists_predict_and_gets_the_models_label(tiny_model, tmp_path):
    images = [write_image(tmp_path / "red.jpg", (220, 60, 60), size=(120, 90)),
              write_image(tmp_path / "blue.png", (60, 60, 220), size=(120, 90))]
    expected = Predictor(tiny_model)
    with served(["apps/pets/app.py", "--model", tiny_model, "--mcp"]) as url:
        for image in images:
            data = f"data:image/{image.suffix[1:].replace('jpg', 'jpeg')};base64,{base64.b64encode(image.read_bytes()).decode()}"
            tools, result = asyncio.run(tools_and_call(url, "predict", {"image": data}))
            # What an assistant reads to pick the tool: what the model tells apart.
            assert "cats" in tools["predict"].description and "dogs" in tools["predict"].description
            assert "flag" not in tools  # flagging is off unless the app's owner turns it on
            assert not result.isError, result.content
            answer = ast.literal_eval(result.content[0].text)
            want = expected.predict(image, k=3)
            assert answer["label"] == max(want, key=want.get)
            assert {c["label"]: c["confidence"] for c in answer["confidences"]} == pytest.approx(want, abs=1e-5)
