"""GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7 (`glm4_moe`): the MoE decoder with grouped-query attention."""

from ..arch import Arch, LazyBuilder
from .config import Glm4MoeConfig
from .gguf import GGUF
from .schema import SCHEMA
from .sizes import Glm4MoeSizes
from .tiny import TINY

ARCH = Arch(
    model_type="glm4_moe",
    title="GLM-4.5, 4.5-Air, 4.6, 4.7",
    hf_architecture="Glm4MoeForCausalLM",
    config=Glm4MoeConfig,
    model=LazyBuilder(f"{__name__}.model", "Glm4MoeBuilder"),  # imports torch: on first use
    schema=SCHEMA,
    sizes=Glm4MoeSizes(),
    gguf=GGUF,
    tiny=TINY,
)
