"""Checks the generated Python SDK against a running router.

Usage: python3 check_sdk.py SDK_DIR GRPC_ADDR USER_MESSAGE MAX_TOKENS
Prints the greedy completion's text as JSON: {"text": ..., "finish_reason": ..., "completion_tokens": ...}.
"""

import json
import sys

sdk_dir, addr, user, max_tokens = sys.argv[1:5]
sys.path.insert(0, sdk_dir)

import grpc  # noqa: E402
from tandem.v1 import client_pb2, client_pb2_grpc, common_pb2  # noqa: E402

channel = grpc.insecure_channel(addr)
stub = client_pb2_grpc.GenerationStub(channel)
models = stub.ListModels(client_pb2.ListModelsRequest(), timeout=10).models
assert len(models) == 1 and models[0].context_length > 0, models
request = client_pb2.GenerateRequest(
    chat=client_pb2.ChatMessages(messages=[client_pb2.ChatMessage(role=client_pb2.CHAT_ROLE_USER, content=user)]),
    stop=common_pb2.StopConditions(max_tokens=int(max_tokens)),
)
text, last = "", None
for chunk in stub.Generate(request, timeout=60):
    text += chunk.text
    last = chunk
try:
    stub.Generate(client_pb2.GenerateRequest(prompt="x", model="no-such-model"), timeout=10).next()
    raise AssertionError("an unknown model was accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e
print(json.dumps({
    "text": text,
    "finish_reason": common_pb2.FinishReason.Name(last.finish_reason),
    "completion_tokens": last.usage.completion_tokens,
}))
