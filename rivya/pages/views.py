"""The pages shell: home, signup, login/logout, account (API keys and credit history)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.db import IntegrityError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from billing import selectors as billing
from rivya import services
from rivya.errors import DomainError, contains_nul
from rivya.models import User
from rivya.pages import account_webhooks
from rivya.pages.common import price_label
from tasks import selectors as tasks
from tasks.models import AIModel, Category

EMAIL_TAKEN = "An account with this email already exists. Log in, or use another email."


class SignupForm(UserCreationForm):
    email = forms.EmailField(required=True)

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ("username", "email")

    def clean_email(self) -> str:
        # The database refuses it too (a unique index on lower(email)); this says it kindly.
        email = self.cleaned_data["email"]
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError(EMAIL_TAKEN, code="email_taken")
        return email


@dataclass(frozen=True)
class CatalogModel:
    model: AIModel
    price: str  # in words (rivya.pages.common.price_label)


@dataclass(frozen=True)
class CatalogGroup:
    category: str
    label: str
    models: list[CatalogModel]


def catalog_groups() -> list[CatalogGroup]:
    """The enabled models with their prices, grouped by category in the catalog's own order
    (image, video, audio, chat)."""
    by_category: dict[str, list[CatalogModel]] = {}
    for model in tasks.models_enabled():
        by_category.setdefault(model.category, []).append(
            CatalogModel(model=model, price=price_label(model))
        )
    return [
        CatalogGroup(category=value, label=label, models=by_category[value])
        for value, label in Category.choices
        if value in by_category
    ]


def home(request: HttpRequest) -> HttpResponse:
    """Signed out: what Rivya does, the catalog with prices, sign up / log in. Signed in: a
    welcome with the credits and the way to each page, then the same catalog."""
    context: dict[str, Any] = {"catalog": catalog_groups()}
    if request.user.is_authenticated:
        context["credits"] = billing.balance_for_user(user=request.user)
        context["header_credits"] = context["credits"]  # one read for the header and the page
    return render(request, "pages/home.html", context)


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.user_signup(
                username=form.cleaned_data["username"],
                email=form.cleaned_data["email"],
                password=form.cleaned_data["password1"],
            )
        except IntegrityError:
            # A concurrent signup took the username or email since validation: validating
            # again names which; anything else is not ours to hide.
            form = SignupForm(request.POST)
            if form.is_valid():
                raise
            return render(request, "registration/signup.html", {"form": form})
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, "Welcome to Rivya! Your signup credits are in your account.")
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form})


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"
    redirect_authenticated_user = True


class LogoutView(auth_views.LogoutView):
    pass


@login_required
@require_http_methods(["GET", "POST"])
def account(request: HttpRequest) -> HttpResponse:
    new_key = None
    if request.method == "POST":
        action = request.POST.get("action")
        if any(contains_nul(value) for value in request.POST.values()):
            # PostgreSQL cannot store NUL characters: refuse them as bad input, not a 500.
            messages.error(request, "Names cannot contain NUL characters.")
            return redirect("account")
        if action == "create_key":
            new_key = services.api_key_create(
                user=request.user, name=request.POST.get("name", "")[:100]
            ).raw
        elif action == "revoke_key":
            try:
                services.api_key_revoke(user=request.user, prefix=request.POST.get("prefix", ""))
                messages.success(request, "The key was revoked.")
            except DomainError as exc:
                messages.error(request, exc.message)
            return redirect("account")
        elif action in account_webhooks.ACTIONS:
            account_webhooks.handle(request, action)
            return redirect("/account/#webhooks")
    return render(
        request,
        "pages/account.html",
        {
            **account_webhooks.context(request),
            "new_key": new_key,
            "api_keys": request.user.api_keys.order_by("-created_at"),
            "credits": billing.balance_for_user(user=request.user),
            "entries": billing.ledger_for_user(user=request.user)[:50],
        },
    )
