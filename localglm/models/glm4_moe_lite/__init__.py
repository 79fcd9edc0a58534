"""GLM-4.7-Flash (`glm4_moe_lite`): the MoE decoder with multi-head latent attention (MLA)."""

from ..arch import Arch, LazyBuilder
from .config import Glm4MoeLiteConfig
from .gguf import GGUF
from .schema import SCHEMA
from .sizes import Glm4MoeLiteSizes
from .tiny import TINY

ARCH = Arch(
    model_type="glm4_moe_lite",
    title="GLM-4.7-Flash",
    hf_architecture="Glm4MoeLiteForCausalLM",
    config=Glm4MoeLiteConfig,
    model=LazyBuilder(f"{__name__}.model", "Glm4MoeLiteBuilder"),  # imports torch: on first use
    schema=SCHEMA,
    sizes=Glm4MoeLiteSizes(),
    gguf=GGUF,
    tiny=TINY,
)
