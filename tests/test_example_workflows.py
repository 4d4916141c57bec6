"""The example workflows in example_workflows/ against the nodes they use, without ComfyUI.

A workflow saved by ComfyUI's frontend stores each node's widget values as a bare list, in the order of
the node's widget inputs; a renamed, added or reordered input makes ComfyUI load the file with values in
the wrong widgets. These tests re-derive that order from INPUT_TYPES (this package's nodes) or from the
recorded signatures of ComfyUI's core nodes, and check every value and every link.
"""
import json
import pathlib

import pytest

from known_node_ids import COMFY_CORE_NODE_IDS
from test_nodes import PACKAGE

WORKFLOW_DIR = pathlib.Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds a 'control_after_generate' value after these
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}

# Inputs (name -> type, widgets as 'COMBO'/'INT'/...) and outputs of the ComfyUI core nodes the examples
# use, as ComfyUI v0.3.64 reports them in /object_info. LoadImage's image widget has an upload button,
# which stores one more value.
CORE_SIGNATURES = {
    "CLIPLoader": ({"clip_name": "COMBO", "type": "COMBO", "device": "COMBO"}, ["CLIP"]),
    "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, ["CONDITIONING"]),
    "CLIPVisionLoader": ({"clip_name": "COMBO"}, ["CLIP_VISION"]),
    "CLIPVisionEncode": ({"clip_vision": "CLIP_VISION", "image": "IMAGE", "crop": "COMBO"}, ["CLIP_VISION_OUTPUT"]),
    "WanImageToVideo": ({"positive": "CONDITIONING", "negative": "CONDITIONING", "vae": "VAE", "width": "INT",
                         "height": "INT", "length": "INT", "batch_size": "INT",
                         "clip_vision_output": "CLIP_VISION_OUTPUT", "start_image": "IMAGE"},
                        ["CONDITIONING", "CONDITIONING", "LATENT"]),
    "VAELoader": ({"vae_name": "COMBO"}, ["VAE"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "SaveAnimatedWEBP": ({"images": "IMAGE", "filename_prefix": "STRING", "fps": "FLOAT", "lossless": "BOOLEAN",
                          "quality": "INT", "method": "COMBO"}, []),
    "LoadImage": ({"image": "COMBO"}, ["IMAGE", "MASK"]),
    "Wan22ImageToVideoLatent": ({"vae": "VAE", "width": "INT", "height": "INT", "length": "INT", "batch_size": "INT",
                                 "start_image": "IMAGE"}, ["LATENT"]),
}
UPLOAD_WIDGETS = {("LoadImage", "image")}
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN21_VAE, WAN22_VAE = "wan_2.1_vae.safetensors", "wan2.2_vae.safetensors"
# Per workflow: the files it names (ComfyUI's Wan 2.1 / 2.2 guides' downloads) as (node type, input) -> value,
# and the sampler, latent and save settings of the official configs (Wan 2.1 generate.py; Wan 2.2
# wan/configs: ti2v_5B 1280x704, 121 frames at 24 fps, 50 steps, shift 5, cfg 5; t2v_A14B 40 steps,
# shift 12, boundary 0.875, guide scales 4.0 high / 3.0 low; i2v_A14B shift 5, boundary 0.900, 3.5 / 3.5;
# A14B 81 frames at 16 fps). boundary 0 / cfg_low_noise -1 on a single model: the inputs do not apply.
EXPECTED = {
    "wan_t2v_multi_gpu.json": dict(
        files={("WanVideoMultiGPULoader", "model"): "wan2.1_t2v_14B_bf16.safetensors",
               ("WanVideoMultiGPULoader", "low_noise_model"): "none", ("VAELoader", "vae_name"): WAN21_VAE},
        sampler=dict(width=832, height=480, num_frames=81, steps=30, cfg=5.0, shift=5.0, boundary=0.0,
                     cfg_low_noise=-1.0), fps=16.0),
    "wan_i2v_multi_gpu.json": dict(
        files={("WanVideoMultiGPULoader", "model"): "wan2.1_i2v_480p_14B_bf16.safetensors",
               ("WanVideoMultiGPULoader", "low_noise_model"): "none", ("VAELoader", "vae_name"): WAN21_VAE,
               ("CLIPVisionLoader", "clip_name"): "clip_vision_h.safetensors"},
        sampler=dict(width=832, height=480, num_frames=81, steps=30, cfg=5.0, shift=3.0, boundary=0.0,
                     cfg_low_noise=-1.0), fps=16.0, latent_node="WanImageToVideo"),
    "wan22_ti2v_5B_t2v.json": dict(
        files={("WanVideoMultiGPULoader", "model"): "wan2.2_ti2v_5B_fp16.safetensors",
               ("WanVideoMultiGPULoader", "low_noise_model"): "none", ("VAELoader", "vae_name"): WAN22_VAE},
        sampler=dict(width=1280, height=704, num_frames=121, steps=50, cfg=5.0, shift=5.0, boundary=0.0,
                     cfg_low_noise=-1.0), fps=24.0),
    "wan22_ti2v_5B_i2v.json": dict(
        files={("WanVideoMultiGPULoader", "model"): "wan2.2_ti2v_5B_fp16.safetensors",
               ("WanVideoMultiGPULoader", "low_noise_model"): "none", ("VAELoader", "vae_name"): WAN22_VAE},
        sampler=dict(width=1280, height=704, num_frames=121, steps=50, cfg=5.0, shift=5.0, boundary=0.0,
                     cfg_low_noise=-1.0), fps=24.0, latent_node="Wan22ImageToVideoLatent"),
    "wan22_a14b_t2v.json": dict(
        files={("WanVideoMultiGPULoader", "model"): "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
               ("WanVideoMultiGPULoader", "low_noise_model"): "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
               ("VAELoader", "vae_name"): WAN21_VAE},
        sampler=dict(width=1280, height=720, num_frames=81, steps=40, cfg=4.0, shift=12.0, boundary=0.875,
                     cfg_low_noise=3.0), fps=16.0),
    "wan22_a14b_i2v.json": dict(
        files={("WanVideoMultiGPULoader", "model"): "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
               ("WanVideoMultiGPULoader", "low_noise_model"): "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
               ("VAELoader", "vae_name"): WAN21_VAE},
        sampler=dict(width=1280, height=720, num_frames=81, steps=40, cfg=3.5, shift=5.0, boundary=0.9,
                     cfg_low_noise=3.5), fps=16.0, latent_node="WanImageToVideo"),
}
# Every workflow encodes its prompts with ComfyUI's umT5-XXL (CLIPLoader type wan).
COMMON_FILES = {("CLIPLoader", "clip_name"): UMT5}


def _kind(spec):
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def signature(node_type):
    """node type -> ([(input name, type, options)] in declaration order, [output types])."""
    if node_type in PACKAGE.NODE_CLASS_MAPPINGS:
        node = PACKAGE.NODE_CLASS_MAPPINGS[node_type]
        declared = node.INPUT_TYPES()
        inputs = [(name, _kind(spec), spec) for section in ("required", "optional")
                  for name, spec in declared.get(section, {}).items()]
        return inputs, list(node.RETURN_TYPES)
    inputs, outputs = CORE_SIGNATURES[node_type]
    return [(name, kind, None) for name, kind in inputs.items()], outputs


def expected_widget_values(node_type, inputs, linked):
    """[(input name, spec or None)] for each stored widget value; None marks a frontend-only value."""
    slots = []
    for name, kind, spec in inputs:
        if kind not in WIDGET_KINDS or name in linked:
            continue
        slots.append((name, spec))
        if (kind == "INT" and name in SEED_NAMES) or (spec and spec[1].get("control_after_generate")):
            slots.append(("control_after_generate", None))
        if (node_type, name) in UPLOAD_WIDGETS:
            slots.append(("upload", None))
    return slots


def check_widget_value(node_type, name, spec, value):
    where = f"{node_type}.{name} = {value!r}"
    kind, options = _kind(spec), spec[1]
    if kind == "COMBO":
        choices = spec[0]
        if name in ("model", "lora"):  # file lists depend on the user's folders
            assert isinstance(value, str) and value.endswith(".safetensors"), where
        elif name == "low_noise_model":  # 'none' (one model) or the low-noise expert's file
            assert value == "none" or (isinstance(value, str) and value.endswith(".safetensors")), where
        else:
            assert value in choices, f"{where} is not one of {choices}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if kind == "INT":
            assert value == int(value), where
        assert options.get("min", value) <= value <= options.get("max", value), where


@pytest.fixture(params=WORKFLOWS, ids=lambda p: p.name)
def workflow_path(request):
    return request.param


@pytest.fixture()
def workflow(workflow_path):
    return json.loads(workflow_path.read_text())


def linked_inputs(node):
    return {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}


def widget_values_by_name(node):
    """{input name: stored value} of a node's widgets (frontend-only values left out)."""
    inputs, _ = signature(node["type"])
    slots = expected_widget_values(node["type"], inputs, linked_inputs(node))
    return {name: value for (name, spec), value in zip(slots, node.get("widgets_values") or [])
            if name not in ("control_after_generate", "upload")}


def nodes_of(workflow, node_type):
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def source_of(workflow, node, input_name):
    """The node whose output feeds `input_name` of `node` (None when the input is open)."""
    link_id = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
    if link_id is None:
        return None
    source = next(link[1] for link in workflow["links"] if link[0] == link_id)
    return next(n for n in workflow["nodes"] if n["id"] == source)


def test_examples_are_present():
    """Every workflow has its expectations below, and every expected workflow is there."""
    assert {p.name for p in WORKFLOWS} == set(EXPECTED)


def test_files_and_settings_are_the_official_ones(workflow_path, workflow):
    expected = EXPECTED[workflow_path.name]
    for (node_type, input_name), value in {**COMMON_FILES, **expected["files"]}.items():
        found = [widget_values_by_name(node)[input_name] for node in nodes_of(workflow, node_type)]
        assert found == [value], f"{workflow_path.name}: {node_type}.{input_name} is {found}, expected {value!r}"
    (sampler,) = nodes_of(workflow, "WanMultiGPUSampler")
    settings = widget_values_by_name(sampler)
    assert {name: settings[name] for name in expected["sampler"]} == expected["sampler"], workflow_path.name
    # the loader plans its memory for the size the sampler makes
    (loader,) = nodes_of(workflow, "WanVideoMultiGPULoader")
    planned = widget_values_by_name(loader)
    assert (planned["width"], planned["height"], planned["num_frames"]) == (
        settings["width"], settings["height"], settings["num_frames"])
    (save,) = nodes_of(workflow, "SaveAnimatedWEBP")
    assert widget_values_by_name(save)["fps"] == expected["fps"]
    # the VAE that decodes is the one the file table names for the model
    (decode,) = nodes_of(workflow, "VAEDecode")
    assert source_of(workflow, decode, "vae")["type"] == "VAELoader"
    assert source_of(workflow, decode, "samples") is sampler


def test_image_to_video_feeds_the_sampler_at_its_size(workflow_path, workflow):
    """The i2v examples' latent node makes the video the sampler is set for, from the loaded image;
    Wan 2.2 image-to-video uses no CLIP vision (the A14B i2v experts have no image embedding)."""
    latent_node = EXPECTED[workflow_path.name].get("latent_node")
    (sampler,) = nodes_of(workflow, "WanMultiGPUSampler")
    source = source_of(workflow, sampler, "latent")
    if latent_node is None:
        assert source is None and not nodes_of(workflow, "LoadImage"), workflow_path.name
        return
    assert source["type"] == latent_node
    size = widget_values_by_name(source)
    settings = widget_values_by_name(sampler)
    assert (size["width"], size["height"], size["length"], size["batch_size"]) == (
        settings["width"], settings["height"], settings["num_frames"], 1)
    assert source_of(workflow, source, "start_image")["type"] == "LoadImage"
    if latent_node == "WanImageToVideo":  # its conditioning carries the image latents to the sampler
        assert source_of(workflow, sampler, "positive") is source and source_of(workflow, sampler, "negative") is source
    if workflow_path.name.startswith("wan22_"):
        assert not nodes_of(workflow, "CLIPVisionLoader")
        if latent_node == "WanImageToVideo":
            assert source_of(workflow, source, "clip_vision_output") is None


def test_every_node_type_is_known(workflow):
    ours = set(PACKAGE.NODE_CLASS_MAPPINGS)
    for node in workflow["nodes"]:
        assert node["type"] in ours or node["type"] in COMFY_CORE_NODE_IDS, f"unknown node type {node['type']}"
        assert node["type"] in ours or node["type"] in CORE_SIGNATURES, f"no recorded signature for {node['type']}"
    assert "WanVideoMultiGPULoader" in {n["type"] for n in workflow["nodes"]}
    assert "WanMultiGPUSampler" in {n["type"] for n in workflow["nodes"]}


def test_widget_values_match_inputs(workflow):
    for node in workflow["nodes"]:
        inputs, _ = signature(node["type"])
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        slots = expected_widget_values(node["type"], inputs, linked)
        values = node.get("widgets_values") or []
        assert len(values) == len(slots), (f"node {node['id']} {node['type']}: {len(values)} widget values for "
                                           f"{[name for name, _ in slots]}")
        for (name, spec), value in zip(slots, values):
            if name == "control_after_generate":
                assert value in CONTROL_AFTER_GENERATE, (node["type"], value)
            elif spec is not None:
                check_widget_value(node["type"], name, spec, value)


def test_node_slots_match_declarations(workflow):
    """The inputs and outputs the file lists for a node are the node's sockets, in order, with their types."""
    for node in workflow["nodes"]:
        inputs, outputs = signature(node["type"])
        sockets = {name: kind for name, kind, _ in inputs}
        for listed in node.get("inputs", []):
            assert listed["name"] in sockets, f"{node['type']} has no input {listed['name']!r}"
            assert listed["type"] == sockets[listed["name"]], (node["type"], listed["name"], listed["type"])
        listed_outputs = [o["type"] for o in node.get("outputs", [])]
        assert listed_outputs == outputs, (node["type"], listed_outputs, outputs)
        if node["type"] in PACKAGE.NODE_CLASS_MAPPINGS:
            names = [o["name"] for o in node["outputs"]]
            assert names == list(PACKAGE.NODE_CLASS_MAPPINGS[node["type"]].RETURN_NAMES), (node["type"], names)
            socket_inputs = [name for name, kind, _ in inputs if kind not in WIDGET_KINDS]
            assert [i["name"] for i in node.get("inputs", []) if i["type"] not in WIDGET_KINDS] == socket_inputs


def test_links_connect_existing_sockets_of_the_same_type(workflow):
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert workflow["last_node_id"] >= max(nodes)
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(link_ids)) == len(link_ids) and workflow["last_link_id"] >= max(link_ids)
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        assert source in nodes and target in nodes, f"link {link_id} joins a missing node"
        output = nodes[source]["outputs"][source_slot]
        target_input = nodes[target]["inputs"][target_slot]
        assert link_id in (output.get("links") or []), f"link {link_id} missing from its source's output"
        assert target_input["link"] == link_id, f"link {link_id} missing from its target's input"
        _, source_outputs = signature(nodes[source]["type"])
        target_inputs = {name: kind for name, kind, _ in signature(nodes[target]["type"])[0]}
        assert link_type == source_outputs[source_slot] == target_inputs[target_input["name"]], (
            f"link {link_id}: {nodes[source]['type']}[{source_slot}] -> {nodes[target]['type']}."
            f"{target_input['name']} carries {link_type}")
    # every link a node lists exists (no dangling references left by an edit)
    for node in workflow["nodes"]:
        for output in node.get("outputs", []):
            assert set(output.get("links") or []) <= set(link_ids), (node["type"], output["name"])
        for listed in node.get("inputs", []):
            assert listed.get("link") is None or listed["link"] in link_ids, (node["type"], listed["name"])


def test_required_sockets_are_connected(workflow):
    """A required socket left open makes ComfyUI refuse the prompt ('Required input is missing')."""
    for node in workflow["nodes"]:
        if node["type"] not in PACKAGE.NODE_CLASS_MAPPINGS:
            continue
        required = PACKAGE.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"]
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        missing = [name for name, spec in required.items() if _kind(spec) not in WIDGET_KINDS and name not in linked]
        assert not missing, f"node {node['id']} {node['type']} leaves required inputs open: {missing}"
