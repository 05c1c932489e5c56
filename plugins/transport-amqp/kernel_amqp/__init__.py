"""RabbitMQ broker and rpc:// result backend for kernel."""
