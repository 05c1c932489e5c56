"""The innermost ``kernel_task_execute``: run the task. Plugins wrap around it."""

from kernel.plugins.hookspecs import hookimpl


@hookimpl(trylast=True)
def kernel_task_execute(request):
    return request.run()
