"""The server's MCP prompts: instructions a user picks by name (a slash command in most clients)
that lead the model through a task with the tools.

* `web_image`: write a FLUX prompt for a web asset and generate it at a size that suits its use;
* `edit_steps`: reach an edit goal in small edit_image steps, looking at each result;
* `web_sizes`: the sizes to generate for the images a web page needs, and the sizes to ship.

Each renders to one user message. Their text is kept short: `prompts/list` is read by clients
(and some show it to the model), and a rendered prompt lands in the conversation.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.prompts import Prompt
from mcp.server.mcpserver.prompts.base import PromptArgument

SIZES: dict[str, tuple[str, int, int, str]] = {
    "hero": ("page hero / banner", 1344, 768, "1920x1080 (16:9), or as the layout needs"),
    "og": ("Open Graph / social link preview", 1216, 640, "1200x630"),
    "card": ("blog or card illustration", 1248, 832, "1200x800 (3:2)"),
    "square": ("square post or avatar", 1024, 1024, "1080x1080"),
    "story": ("portrait story / mobile", 768, 1344, "1080x1920 (9:16)"),
    "icon": ("app icon / favicon", 1024, 1024, "512, 192, 180 and 32 px squares"),
    "background": ("page background / texture", 1440, 960, "tiled or cover-scaled"),
}
"""Use -> (what it is, width and height to generate, the size to ship). The generated sizes are
multiples of 32 within 512-1440, which every provider's FLUX models take, in the shipped size's
aspect ratio; the shipped size is a resize or crop of that file."""

FLUX_PROMPTING = (
    "Write the FLUX prompt as plain sentences, most important first: the subject and what it does, the "
    "setting, then style (photo, flat vector, 3D render, watercolor...), lighting, colour palette and "
    "composition (camera angle, framing, where empty space is left for page text). Put any words the "
    "image must show in double quotes. FLUX has no negative prompt: describe what you want, not what you "
    "don't. 40-80 words is plenty.")


def size_table(only: list[str] | None = None) -> str:
    """The rows of `SIZES` for `only` (all when empty), one line each."""
    keys = [k for k in SIZES if not only or k in only] or list(SIZES)
    return "\n".join(f"- {k}: {SIZES[k][0]}: generate {SIZES[k][1]}x{SIZES[k][2]}, ship {SIZES[k][3]}"
                     for k in keys)


ALIASES = {"banner": "hero", "header": "hero", "opengraph": "og", "og-image": "og", "social": "og",
           "twitter": "og", "twitter-card": "og", "blog": "card", "illustration": "card", "thumbnail": "card",
           "avatar": "square", "post": "square", "portrait": "story", "mobile": "story", "favicon": "icon",
           "app-icon": "icon", "logo": "icon", "texture": "background", "pattern": "background"}
"""Other words for the uses in `SIZES`."""


def uses_in(text: str) -> list[str]:
    """The `SIZES` keys that `text` ('hero, og-image and a favicon') names, in its order."""
    found: list[str] = []
    for word in re.split(r"[^a-z-]+", text.lower()):
        key = next((k for k in (word, word.removesuffix("s")) if k in SIZES or k in ALIASES), None)
        use = None if key is None else ALIASES.get(key, key)
        if use is not None and use not in found:
            found.append(use)
    return found


def _prompt(server: MCPServer[Any], title: str, described: dict[str, str]) -> Callable[[Callable[..., str]], None]:
    """Registers a prompt whose arguments are the function's (all strings, as prompt arguments are on the
    wire), described by `described`. Built directly rather than by the SDK's decorator, which derives a
    validating model and its JSON schema per prompt: a cost every server start paid for three functions
    that take strings. A missing required argument is refused by the SDK before the function runs."""

    def register(fn: Callable[..., str]) -> None:
        params = inspect.signature(fn).parameters.values()
        arguments = [PromptArgument(name=p.name, description=described[p.name], required=p.default is p.empty)
                     for p in params]
        server.add_prompt(Prompt(name=fn.__name__, title=title, description=fn.__doc__ or "", arguments=arguments,
                                 fn=fn, context_kwarg=None))

    return register


def add_prompts(server: MCPServer[Any]) -> None:
    """Registers the prompts on `server`."""

    @_prompt(server, "Image for a web page", {
        "subject": "What the image shows.", "use": f"One of {', '.join(SIZES)}.",
        "style": "E.g. flat vector, photo, 3D render.",
        "save_to": "Where in the project, e.g. public/images/hero.webp."})
    def web_image(
        subject: str, use: str = "hero", style: str = "", save_to: str = "") -> str:
        """Write a FLUX prompt for a web asset and generate it at the size its use needs."""
        named = uses_in(use)
        kind = named[0] if named else "hero"
        what, width, height, ship = SIZES[kind]
        target = save_to or f"public/images/{kind}.webp"
        return (f"Create an image for a web page ({what}) showing: {subject}."
                + (f" Style: {style}." if style else "")
                + ("" if named else f" ({use!r} is not a use this prompt knows: sized as a hero.)")
                + "\n\n" + FLUX_PROMPTING + "\n\n"
                f"Then call generate_image with that prompt, width={width}, height={height} and "
                f"save_to={target!r}. Look at the preview; if it misses, say what is wrong and adjust "
                f"the prompt once or twice (each call is a new paid job). The shipped size is {ship}: "
                "resize or crop the saved file to it if the page needs exact pixels, and reference the "
                "saved path in the code.")

    @_prompt(server, "Edit an image step by step", {
        "image": "The image: a project path, URL or data: URI.",
        "goal": "What the finished image should look like."})
    def edit_steps(
        image: str, goal: str) -> str:
        """Reach an edit goal in small edit_image steps, checking each result."""
        return (f"Edit the image {image} until: {goal}\n\n"
                "1. Split the goal into small changes, one per step (FLUX Kontext follows one clear "
                "instruction best), in an order where later steps do not undo earlier ones.\n"
                "2. For each step call edit_image with the previous result's local path as image and an "
                "instruction that names the change and what to keep, e.g. 'replace the sky with a "
                "sunset; keep the buildings and the lighting on them unchanged'.\n"
                "3. Look at each preview before the next step; if a step went wrong, redo it from the "
                "image before it with a more precise instruction instead of stacking fixes.\n"
                "4. Pass save_to on the last step to put the result in the project, and list the steps "
                "taken and each step's prediction_id.")

    @_prompt(server, "Image sizes for a web page", {
        "uses": f"Which images, e.g. 'hero, og'; any of {', '.join(SIZES)}."})
    def web_sizes(
        uses: str = "") -> str:
        """Which width and height to generate for each web image, and the size to ship."""
        return ("Sizes for the page's images (generated at multiples of 32 within 512-1440, which every "
                "FLUX model here takes; pass "
                "them as width and height to generate_image, then resize or crop the saved file to the "
                "shipped size):\n" + size_table(uses_in(uses)) + "\n\nSuggest which of these the page "
                "needs, with a save_to path in the project for each.")
