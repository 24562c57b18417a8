"""stepscope's training engine: LoRA runs that record every optimizer step.

It uses the recorded-data layer (`store`) and the analysis (`analysis`), never the server (`app`), so a
run can train on a machine without the web server's modules.
"""
