"""The dashboard's HTML pages, one module per group: `runs` (the list and a run's page), `form` (the new-run
form), `compare` (compare and sweep pages), `playground` (runs' adapters answering a prompt) and `auth`
(sign-in); `render` holds what they share.

Pages are rendered here; their charts fetch data from the JSON API (see static/*.js), so a page
load never waits for metric rows.
"""

from fastapi import APIRouter

from app.pages import auth, compare, form, playground, runs

router = APIRouter(include_in_schema=False)
for module in (auth, form, runs, compare, playground):  # form first: its /runs/new before runs' /runs/{run_id}
    router.include_router(module.router)
