"""GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7 (`glm4_moe`): the MoE decoder with grouped-query attention."""

from ..arch import Arch
from .config import Glm4MoeConfig
from .gguf import GGUF
from .model import Glm4MoeBuilder
from .schema import SCHEMA
from .sizes import Glm4MoeSizes
from .tiny import TINY

ARCH = Arch(
    model_type="glm4_moe",
    title="GLM-4.5, 4.5-Air, 4.6, 4.7",
    hf_architecture="Glm4MoeForCausalLM",
    config=Glm4MoeConfig,
    model=Glm4MoeBuilder(),
    schema=SCHEMA,
    sizes=Glm4MoeSizes(),
    gguf=GGUF,
    tiny=TINY,
)
