"""The collector's settings for a serving process (collector.settle_after_start), in a fresh interpreter
each: freezing is for the life of a process, and this one runs the other tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from kontext_gateway.collector import YOUNG_THRESHOLD


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_start_up_heap_is_set_aside_and_young_collections_are_rarer() -> None:
    seen = run(
        """
        import gc, json
        from kontext_gateway.collector import pause_while_starting, settle_after_start

        default = gc.get_threshold()
        pause_while_starting()
        import kontext_gateway.api.app  # the serving process's modules, imported with the collector off
        paused = not gc.isenabled()
        frozen = settle_after_start()
        print(json.dumps({
            "frozen": frozen, "freeze_count": gc.get_freeze_count(), "default": default, "paused": paused,
            "enabled": gc.isenabled(), "threshold": gc.get_threshold(), "tracked": len(gc.get_objects()),
        }))
        """
    )
    assert seen["paused"] and seen["enabled"]
    assert seen["frozen"] == seen["freeze_count"] > 50_000
    # What a full collection still walks is what came after, not the start-up heap.
    assert seen["tracked"] < seen["frozen"] / 10
    assert seen["threshold"] == [YOUNG_THRESHOLD, *seen["default"][1:]]
    assert seen["default"][0] < YOUNG_THRESHOLD


def test_cyclic_garbage_is_still_collected_without_being_asked() -> None:
    # Cycles that only the collector can free, each holding 100 KB: made after settling, never collected
    # by hand. They are freed in batches as new containers pass the threshold, so the memory they hold
    # stays bounded (a few thousand at most alive at once, not all 30,000).
    seen = run(
        """
        import gc, json, weakref
        from kontext_gateway.collector import pause_while_starting, settle_after_start

        pause_while_starting()
        settle_after_start()
        freed = 0
        most_alive = 0

        class Node:
            pass

        def on_free(_):
            global freed
            freed += 1

        refs = []
        for made in range(1, 30_001):
            node = Node()
            node.self = node
            node.payload = bytes(100_000)
            refs.append(weakref.ref(node, on_free))
            del node
            most_alive = max(most_alive, made - freed)
        print(json.dumps({"freed": freed, "most_alive": most_alive}))
        """
    )
    assert seen["freed"] > 25_000
    assert seen["most_alive"] <= YOUNG_THRESHOLD


def test_a_local_model_load_leaves_no_garbage_holding_the_request_images() -> None:
    # The first local request imports torch and diffusers and builds the model: that leaves reference
    # cycles reaching the loading request's frames, and so its decoded input image. With young
    # collections rarer, the gateway collects after a load itself; here nothing else collects.
    seen = run(
        f"""
        import gc, io, json, sys, tempfile
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import httpx
        from PIL import Image
        from conftest import running_server
        from kontext_gateway.collector import pause_while_starting, settle_after_start
        from kontext_gateway.config import Settings

        pause_while_starting()
        data = Path(tempfile.mkdtemp())
        photo = io.BytesIO()
        Image.new("RGB", (1600, 1200), "teal").save(photo, "JPEG")
        with running_server(Settings(data_dir=data, database_url=f"sqlite:///{{data / 'gateway.db'}}")) as url:
            settle_after_start()
            gc.disable()
            answer = httpx.post(
                f"{{url}}/v1/images/edits",
                data={{"model": "kontext-tiny", "prompt": "night", "size": "256x256", "num_inference_steps": "2"}},
                files={{"image": ("photo.jpg", photo.getvalue(), "image/jpeg")}},
                timeout=600,
            )
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            held = [
                f"{{type(o).__name__}} -> {{ref!r}}"
                for o in gc.garbage
                for ref in gc.get_referents(o)
                if isinstance(ref, Image.Image)
            ]
            print(json.dumps({{"status": answer.status_code, "body": answer.text[:300], "held": held}}))
        """
    )
    assert seen["status"] == 200, seen["body"]
    assert seen["held"] == []
