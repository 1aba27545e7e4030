"""The built-in CPU demo: synthetic shapes, end-to-end training and a prompt-adherence score."""
