"""SQL inspection: dialect inspectors that turn SQL text into `StatementInfo` attributes."""
