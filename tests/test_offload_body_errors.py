"""An exception raised in the body of ``async with OffloadManager`` comes out as raised."""

from __future__ import annotations

import pytest

from kvtier.errors import InvalidRequestError
from tests.offload_env import Env


@pytest.mark.asyncio
async def test_a_typed_error_in_the_body_is_not_wrapped_in_an_exception_group() -> None:
    """An engine's ``except InvalidRequestError`` around its loop must still match."""
    env = Env(gpu_blocks=16, cpu_blocks=8)

    async def loop() -> None:
        async with env.manager as manager:
            request = env.request(2)
            # 7 external tokens are not a whole number of blocks: refused.
            manager.update_state_after_alloc(request, env.alloc(request, 2), 7)

    with pytest.raises(InvalidRequestError):
        await loop()


@pytest.mark.asyncio
async def test_the_engines_own_error_in_the_body_comes_out_as_raised() -> None:
    class EngineError(Exception):
        pass

    env = Env(gpu_blocks=16, cpu_blocks=8)

    async def loop() -> None:
        async with env.manager:
            raise EngineError("the model crashed")

    with pytest.raises(EngineError, match="the model crashed"):
        await loop()


@pytest.mark.asyncio
async def test_an_exception_group_raised_in_the_body_comes_out_as_raised() -> None:
    """The engine's own task group failing: its group, not a group around it."""
    env = Env(gpu_blocks=16, cpu_blocks=8)
    raised = ExceptionGroup("the engine's tasks", [ValueError("a"), KeyError("b")])

    async def loop() -> None:
        async with env.manager:
            raise raised

    with pytest.raises(ExceptionGroup) as info:
        await loop()
    assert info.value is raised
