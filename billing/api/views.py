from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing import selectors
from billing.api.serializers import CreditsSerializer, LedgerEntrySerializer


class CreditsView(APIView):
    """The caller's balance, held and available credits."""

    @extend_schema(responses=CreditsSerializer)
    def get(self, request: Request) -> Response:
        balance = selectors.balance_for_user(user=request.user)
        return Response(CreditsSerializer(balance).data)


class LedgerView(generics.ListAPIView):
    """The caller's ledger entries, newest first (cursor-paginated)."""

    serializer_class = LedgerEntrySerializer

    def get_queryset(self) -> Any:
        return selectors.ledger_for_user(user=self.request.user)
