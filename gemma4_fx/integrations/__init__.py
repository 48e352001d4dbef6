"""gemma4_fx inside inference engines that run Inductor themselves. One module per engine, imported by name only
where that engine is installed (`import gemma4_fx` imports none of them): `gemma4_fx.integrations.vllm`."""
