"""The API: products (CRUD plus a ``restock`` action), stock movements (read-only) and a ping.

``ATOMIC_REQUESTS`` wraps each view in a transaction: ``restock`` records the movement and saves the
product, then refuses a shelf over capacity; DRF's exception handler marks the transaction for
rollback, so the refused restock leaves nothing written. ``ping`` opts out of the transaction and
never touches the database.
"""

from typing import Any

from django.db import transaction
from rest_framework import status, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response

from inventory.models import Product, StockMovement
from inventory.serializers import ProductSerializer, RestockSerializer, StockMovementSerializer


class OverCapacity(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The shelf cannot hold that many units."
    default_code = "over_capacity"


class ProductViewSet(viewsets.ModelViewSet):
    queryset = Product.objects.all()
    serializer_class = ProductSerializer

    @action(detail=True, methods=["post"])
    def restock(self, request: Request, pk: Any = None) -> Response:
        serializer = RestockSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        product = self.get_object()
        added = serializer.validated_data["quantity"]
        StockMovement.objects.create(product=product, change=added)
        product.quantity += added
        product.save(update_fields=["quantity", "updated"])
        if product.quantity > product.capacity:
            raise OverCapacity()
        return Response(ProductSerializer(product).data)


class StockMovementViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = StockMovement.objects.all()
    serializer_class = StockMovementSerializer


@transaction.non_atomic_requests
@api_view(["GET"])
def ping(request: Request) -> Response:
    return Response({"service": "warehouse", "status": "up"})
