"""Greedy generation by onnxruntime-genai's generator from an ONNX export folder (its genai_config.json).

Runs in the ortgenai peer venv; prints the new token ids as JSON:
    benchmarks/.venvs/ortgenai/bin/python benchmarks/peers/genai_generate.py FOLDER '[1, 2, 3]' [NEW_TOKENS]
"""
import json
import sys
import onnxruntime_genai as og
folder, prompt = sys.argv[1], json.loads(sys.argv[2])
new = int(sys.argv[3]) if len(sys.argv) > 3 else 16
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + new, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(prompt)
out = []
while not gen.is_done():
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print(json.dumps(out))
